"""SIGKILL the train stage at random moments and rerun it until it finishes: the result is the one of an
uninterrupted run, and no temporary file survives."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from offroad import artifacts
from stages import class_weights
from tests.conftest import REPO, TINY, write_params

EPOCHS = 8
# Batches of one image: each epoch takes several optimizer steps, so kills land inside epochs.
PARAMS = {**TINY, "train.epochs": EPOCHS, "train.batch_size": 1, "train.num_workers": 0, "train.device": "cpu",
          "model.head_channels": 16}
OUTPUTS = ("models", "plots", "metrics")


@pytest.fixture
def workdir(tiny_dataset, tmp_path, monkeypatch) -> Path:
    """What the train stage reads: stages/, offroad/, params.yaml, data/prepared/ and data/class_weights.json."""
    work = tmp_path / "work"
    for package in ("stages", "offroad"):
        shutil.copytree(REPO / package, work / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(tiny_dataset.prepared, work / "data/prepared")
    write_params(work / "params.yaml", PARAMS)
    monkeypatch.chdir(work)
    class_weights.main()
    return work


def start_training(work: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    return subprocess.Popen([sys.executable, "-m", "stages.train"], cwd=work, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def epoch_of(line: str) -> int:
    """The epoch number of a progress line `epoch   3/8 | ...`, else 0."""
    return int(line.split()[1].split("/")[0]) if line.startswith("epoch ") else 0


def kill_after(work: Path, ready, delay: float) -> str:
    """Start training, SIGKILL its process group `delay` seconds after the first log line that is `ready`."""
    process = start_training(work)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if ready(line):
            break
    time.sleep(delay)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    process.stdout.close()
    log = "".join(lines)
    assert process.returncode == -signal.SIGKILL, log  # killed, not finished or failed
    return log


def temporaries(work: Path) -> list[str]:
    return [str(p.relative_to(work)) for top in OUTPUTS for p in (work / top).rglob(".*")
            if p.name.endswith((".tmp", ".tmpdir", ".old"))]


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_killed_and_resumed_training_equals_an_uninterrupted_run(workdir, tmp_path):
    reference = Path(shutil.copytree(workdir, tmp_path / "reference"))
    uninterrupted_run = subprocess.Popen([sys.executable, "-m", "stages.train"], cwd=reference, text=True,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # alongside the kills
    rng = random.Random(2024)
    # One kill somewhere in start-up or the first epochs, then two shortly after epochs drawn at random,
    # with five epochs or more still to go.
    kills = [(lambda line: line.startswith("train:"), rng.uniform(0.0, 0.3))]
    for k in sorted(rng.sample(range(1, EPOCHS - 4), 2)):
        kills.append((lambda line, k=k: epoch_of(line) >= k, rng.uniform(0.0, 0.1)))
    saved = []
    for ready, delay in kills:
        kill_after(workdir, ready, delay)
        last = workdir / "models/last.pt"
        saved.append(torch.load(last, weights_only=True)["epoch"] if last.exists() else 0)  # never half-written
    assert saved == sorted(saved) and 0 < saved[-1] < EPOCHS

    dead = dead_pid()  # what a kill in the middle of a write leaves behind
    for orphan in (f"models/.last.pt.{dead}.tmp", f"metrics/run/.train.json.{dead}.tmp"):
        (workdir / orphan).parent.mkdir(parents=True, exist_ok=True)
        (workdir / orphan).write_bytes(b"half")
    final = subprocess.run([sys.executable, "-m", "stages.train"], cwd=workdir, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    assert f"resume: continuing after epoch {saved[-1]}" in final.stdout
    assert uninterrupted_run.wait() == 0, uninterrupted_run.stderr.read()

    for series in artifacts.HISTORY_FILES:  # DVCLive's log: the resumed run's is the uninterrupted run's
        assert (workdir / series).read_text() == (reference / series).read_text(), series
    resumed, uninterrupted = (json.loads((w / artifacts.TRAIN_METRICS).read_text()) for w in (workdir, reference))
    assert resumed == uninterrupted  # the results; how each run ran is in metrics/run/train.json
    ran = [json.loads((w / "metrics/run/train.json").read_text()) for w in (workdir, reference)]
    assert ran[0]["resumed_from_epoch"] == saved[-1] and ran[1]["resumed_from_epoch"] == 0
    assert uninterrupted["epochs_run"] == EPOCHS
    for name in ("best.pt", "final.pt"):
        a, b = (torch.load(w / "models" / name, weights_only=True) for w in (workdir, reference))
        assert a.keys() == b.keys() and a["head"].keys() == b["head"].keys()
        assert all(torch.equal(a["head"][k], b["head"][k]) for k in a["head"])
        assert {k: v for k, v in a.items() if k != "head"} == {k: v for k, v in b.items() if k != "head"}
    assert temporaries(workdir) == []
