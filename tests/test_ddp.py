"""Several training processes from `dvc repro`: with train.processes=2, 2 CPU processes (gloo) give the
single-process history up to float noise; a worker killed mid-epoch stops the stage with an error naming its
rank, leaves no process and no partial output, and `dvc repro` resumes; bad launch params are named errors."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from offroad import launch
from offroad.config import ParamsError, apply_overrides
from tests.conftest import copy_repo, make_params, train_summary, history_rows

# 5 train images in batches of 2: the last global batch has 1 image, so rank 1's share of it is empty
# (it must still join the gradient all-reduce); 3 val images split 2 + 1. Class-weighted CE with uneven
# shares is where a per-process loss mean would differ from the single-process one.
PARAMS = {"data.image_size": [112, 56], "synthetic.width": 224, "synthetic.height": 126, "prepare.workers": 1,
          "synthetic.train": 5, "synthetic.val": 3, "train.epochs": 3, "train.batch_size": 2,
          "train.num_workers": 0, "train.device": "cpu", "train.amp": False, "train.early_stopping_patience": 0,
          "augment.enabled": True, "loss.class_weighted": True}
OUTPUTS = ("models/best.pt", "models/final.pt", "dvclive/metrics.json", "dvclive/plots/metrics/val/iou.tsv")


def read_history(repo: Path) -> list[dict]:
    return history_rows(repo / "dvclive")


def assert_same_history(a: list[dict], b: list[dict]) -> None:
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b]
    for x, y in zip(a, b):
        for column, value in x.items():
            assert y[column] == pytest.approx(value, rel=1e-4, abs=1e-5), (x["epoch"], column)


def dvc_env() -> dict:
    return {**os.environ, "DVC_NO_ANALYTICS": "1", "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONUNBUFFERED": "1",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=dvc_env(), capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A git + DVC copy of the project with PARAMS and the stages before train run (by `dvc repro`)."""
    repo = copy_repo(tmp_path_factory.mktemp("ddp") / "repo", PARAMS)
    result = dvc(repo, "repro", "class_weights")
    assert result.returncode == 0, result.stdout + result.stderr
    return repo


def workspace(prepared: Path, tmp_path: Path, overrides: dict) -> Path:
    repo = Path(shutil.copytree(prepared, tmp_path / "repo", symlinks=True))
    params = apply_overrides(yaml.safe_load((repo / "params.yaml").read_text()), overrides)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return repo


def test_dvc_repro_with_two_processes_trains_like_one(prepared, tmp_path):
    repo = workspace(prepared, tmp_path, {})
    runs = {}
    for n in (1, 2):
        workspace_params = yaml.safe_load((repo / "params.yaml").read_text())
        workspace_params["train"]["processes"] = n
        (repo / "params.yaml").write_text(yaml.safe_dump(workspace_params, sort_keys=False))
        result = dvc(repo, "repro", "train")
        assert result.returncode == 0, result.stdout + result.stderr
        assert ("launching 2 process(es) on this node" in result.stdout) == (n == 2)
        assert "Running stage 'class_weights'" not in result.stdout
        lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["train"]
        assert lock["params"]["params.yaml"]["train.processes"] == n  # the launch is recorded with the run
        runs[n] = (read_history(repo), train_summary(repo),
                   torch.load(repo / "models/final.pt", weights_only=True)["head"])
    (single, single_summary, single_head), (ddp, ddp_summary, ddp_head) = runs[1], runs[2]

    assert [r["epoch"] for r in ddp] == [r["epoch"] for r in single] == [1, 2, 3]
    assert_same_history(single, ddp)
    for name, tensor in single_head.items():
        torch.testing.assert_close(ddp_head[name], tensor, rtol=1e-3, atol=1e-4)  # Adam amplifies noise in ~0 grads
    assert (single_summary["world_size"], ddp_summary["world_size"]) == (1, 2)
    assert ddp_summary["resumed_from_epoch"] == 0  # a complete single-process state is not resumed
    # every epoch: 5 train forwards (6 under DDP: rank 1 runs a zero-weight image for its empty share);
    # the 3 val features once, reused in epochs 2 and 3
    assert (single_summary["backbone_forwards"], single_summary["backbone_forwards_saved"]) == (18, 6)
    assert (ddp_summary["backbone_forwards"], ddp_summary["backbone_forwards_saved"]) == (21, 3)
    assert [p.name for p in repo.rglob(".*.tmp*")] == []  # rank 1 wrote nothing half-way
    assert dvc(repo, "status", "train").stdout.strip() == "Data and pipelines are up to date."


KILL_EPOCHS = 3
# Batches of one image: each epoch takes several optimizer steps, so the kill lands inside an epoch.
KILL_PARAMS = {"train.epochs": KILL_EPOCHS, "train.batch_size": 1, "model.head_channels": 16, "train.processes": 2}


def worker(process: psutil.Process, rank: int) -> psutil.Process:
    found = [p for p in process.children(recursive=True) if p.environ().get("RANK") == str(rank)]
    assert len(found) == 1, found
    return found[0]


def test_a_killed_worker_stops_the_stage_and_dvc_repro_resumes(prepared, tmp_path):
    repo = workspace(prepared, tmp_path, KILL_PARAMS)
    stage = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "train"], cwd=repo, env=dvc_env(), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines = []
    for line in stage.stdout:
        lines.append(line)
        if line.startswith("epoch   1/"):
            break
    tree = psutil.Process(stage.pid).children(recursive=True)
    victim = worker(psutil.Process(stage.pid), 1)
    victim.send_signal(signal.SIGKILL)  # rank 1, inside epoch 2
    out, err = stage.communicate(timeout=120)
    log = "".join(lines) + out + err
    assert stage.returncode != 0, log
    assert f"error: train: worker rank 1 (pid {victim.pid}) was killed by SIGKILL" in err, log
    assert "`dvc repro` resumes" in err
    assert [p.pid for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] == []
    assert [f for f in OUTPUTS[:2] if (repo / f).exists()] == []  # no models: only the resume state
    assert [p.name for p in repo.rglob(".*.tmp*")] == []
    saved = torch.load(repo / "models/last.pt", weights_only=True)["epoch"]
    assert 1 <= saved < KILL_EPOCHS
    # DVCLive's log shows the stopped run up to the same epoch, without results
    assert [r["epoch"] for r in read_history(repo)] == list(range(1, saved + 1))
    assert "epochs_run" not in json.loads((repo / "dvclive/metrics.json").read_text())

    resumed = dvc(repo, "repro", "train")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resume: continuing after epoch {saved}" in resumed.stdout
    summary = train_summary(repo)
    assert (summary["resumed_from_epoch"], summary["epochs_run"], summary["world_size"]) == (saved, KILL_EPOCHS, 2)
    assert [r["epoch"] for r in read_history(repo)] == list(range(1, KILL_EPOCHS + 1))


def test_bad_launch_params_are_named_errors(monkeypatch):
    with pytest.raises(ParamsError, match=r"'train.processes': Input should be greater than or equal to 1"):
        make_params({"train.processes": 0})
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(launch.LaunchError, match=r"train.processes is 2 but this node has 1 CUDA device\(s\)"):
        launch.check(make_params({"train.processes": 2}).train, cuda)
    with pytest.raises(launch.LaunchError, match=r"train.device is 'cuda:1' but train.processes is 2"):
        launch.check(make_params({"train.processes": 2}).train, torch.device("cuda", 1))
    monkeypatch.delenv(launch.RDZV_ENDPOINT, raising=False)
    with pytest.raises(launch.LaunchError, match=r"train.nodes is 2: set OFFROAD_RDZV_ENDPOINT=HOST:PORT"):
        launch.check(make_params({"train.nodes": 2}).train, torch.device("cpu"))
    monkeypatch.setenv(launch.RDZV_ENDPOINT, "node0:29500")
    launch.check(make_params({"train.nodes": 2}).train, torch.device("cpu"))


def test_one_node_listens_on_loopback_only(tmp_path, monkeypatch):
    out = tmp_path / "listening.json"
    monkeypatch.setenv("LISTENING_OUT", str(out))
    other = next((i for i in sorted(os.listdir("/sys/class/net")) if i != "lo"), None)
    if other:  # a setting left over for multi-node jobs changes nothing on one node
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", other)
    lines = []
    launch.launch(make_params({"train.processes": 2}).train, torch.device("cpu"), "tests.listening", log=lines.append)
    addresses = json.loads(out.read_text())
    assert addresses  # gloo's own connections, at least
    assert [a for a in addresses if not a.startswith(("127.", "::1:"))] == []
    assert "rendezvous in a private folder, loopback only" in lines[0]
    assert not any(k in os.environ for k in ("OFFROAD_INIT_FILE", "OFFROAD_LAUNCHER_PID"))
