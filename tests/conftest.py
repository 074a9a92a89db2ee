"""Shared test helpers: params files with overrides, a tiny synthetic dataset, a git + DVC copy of the repo."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from offroad.artifacts import PreparedSplit, load_split
from offroad.data import prepare_split
from offroad.config import Params, apply_overrides, validate
from offroad.synthetic import write_dataset

REPO = Path(__file__).resolve().parents[1]
# Small enough for seconds-long tests: synthetic scenes at 224x126, prepared at 112x56 (8x4 ViT tokens).
TINY = {"data.image_size": [112, 56], "synthetic.train": 6, "synthetic.val": 3, "synthetic.test": 4,
        "synthetic.width": 224, "synthetic.height": 126}

# The source report's train-split pixel counts per class (its table "Class Weights Used").
REPORT_PIXELS = {"Sky": 132_501_218, "Landscape": 85_243_863, "Dry Grass": 66_295_865, "Lush Bushes": 21_002_552,
                 "Background": 20_439_451, "Ground Clutter": 15_382_574, "Trees": 12_536_643, "Rocks": 4_199_770,
                 "Dry Bushes": 3_864_657, "Logs": 275_319}


def with_overrides(overrides: dict[str, Any] | None = None) -> dict:
    """The repo's params.yaml as a dict, with dotted-key overrides ({"data.image_size": [112, 56]}; a new key
    as "+optimizer.lrr", see offroad.config.apply_overrides)."""
    return apply_overrides(yaml.safe_load((REPO / "params.yaml").read_text()), overrides or {}, "params.yaml")


def write_params(path: str | Path, overrides: dict[str, Any] | None = None) -> Path:
    """Write the repo's params.yaml with dotted-key overrides to `path` (a file); return it."""
    path = Path(path)
    path.write_text(yaml.safe_dump(with_overrides(overrides), sort_keys=False))
    return path


def make_params(overrides: dict[str, Any] | None = None) -> Params:
    """Validated Params: the repo's params.yaml with dotted-key overrides."""
    return validate(with_overrides(overrides), "test params")


@pytest.fixture
def tiny_params() -> Params:
    """Repo params with TINY overrides (synthetic 6 + 3 scenes at 224x126, image_size [112, 56])."""
    return make_params(TINY)


@dataclass(frozen=True)
class TinyDataset:
    root: Path  # raw PNGs: root/{train,val}/{Color_Images,Segmentation}/NAME.png (224x126, 16-bit raw-id masks)
    prepared: Path  # prepared arrays: prepared/{train,val}/{images.npy, masks.npy, split.json} (112x56)
    params: Params  # repo params + TINY, with data.root = root
    train: PreparedSplit  # 6 images
    val: PreparedSplit  # 3 images
    test: PreparedSplit  # 4 images


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> TinyDataset:
    """A TinyDataset made once per session with offroad.synthetic (seed 0) and offroad.data.prepare_split.

    Read-only: copy files before changing them. Every split holds Sky, Landscape and Dry Grass; rare
    classes (Logs above all) may be absent at this size.
    """
    base = tmp_path_factory.mktemp("tiny")
    params = make_params({**TINY, "data.root": str(base / "synthetic")})
    cfg = params.synthetic
    write_dataset(base / "synthetic", {"train": cfg.train, "val": cfg.val, "test": cfg.test}, cfg.seed, cfg.width,
                  cfg.height)
    for split in ("train", "val", "test"):
        prepare_split(base / "synthetic", split, base / "prepared", params.data, workers=1)
    return TinyDataset(base / "synthetic", base / "prepared", params, *(load_split(base / "prepared", s)
                                                                         for s in ("train", "val", "test")))


REPO_FILES = ["stages", "offroad", "experiments", "dvc_templates", "dvc.yaml", "params.yaml", ".dvc/config", ".dvc/.gitignore", ".dvcignore",
              ".gitignore"]


def git(repo: Path, *args: str) -> str:
    """`git ARGS` in `repo` with a fixed identity; returns stdout, raises on failure."""
    cmd = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "-c", "commit.gpgsign=false", *args]
    return subprocess.run(cmd, cwd=repo, check=True, capture_output=True, text=True).stdout


def copy_repo(repo: Path, overrides: dict[str, Any] | None = None) -> Path:
    """Copy the project's stages/, experiments/, dvc.yaml, params.yaml (with dotted-key `overrides`) and DVC
    config into a fresh git repository at `repo` with one commit; no data, dvc.lock or outputs."""
    for name in REPO_FILES:
        src, dst = REPO / name, repo / name
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    if overrides:
        write_params(repo / "params.yaml", overrides)
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "test copy"]):
        git(repo, *args)
    return repo


@pytest.fixture
def repo_copy(tmp_path) -> Path:
    """A fresh git repository (one commit) holding the project's stages/, dvc.yaml, params.yaml and DVC
    config, without data, dvc.lock or outputs: run real `dvc` commands in it with `run_dvc`."""
    return copy_repo(tmp_path / "repo")


def train_summary(repo: Path) -> dict:
    """What the train stage wrote: its results (DVCLive's dvclive/metrics.json) and how it ran
    (metrics/run/train.json)."""
    return {**json.loads((repo / "dvclive/metrics.json").read_text()),
            **json.loads((repo / "metrics/run/train.json").read_text())}


def history_rows(live: Path) -> list[dict]:
    """The per-epoch rows DVCLive logged in `live` (a dvclive folder): {"epoch": int, column: float, ...}."""
    from offroad.artifacts import HISTORY_COLUMNS, read_history  # noqa: PLC0415
    history = read_history(live / "plots/metrics")
    return [{c: int(history[c][i]) if c == "epoch" else float(history[c][i]) for c in HISTORY_COLUMNS}
            for i in range(len(history["epoch"]))]


def write_history(live: Path, rows: list[dict]) -> None:
    """History rows logged through DVCLive into `live`, as the train stage logs them."""
    from offroad.training import open_log  # noqa: PLC0415
    open_log(live, rows).end()


def run_dvc(repo: Path, *args: str, check: bool = True, timeout: float | None = None) -> subprocess.CompletedProcess:
    """`dvc ARGS` in `repo` with this interpreter's environment first on PATH (stage commands call `python`);
    `timeout`: seconds, after which it is killed (subprocess.TimeoutExpired)."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "NO_ALBUMENTATIONS_UPDATE": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


# The whole pipeline in seconds (as test_dvc_workflow.TINY_RUN): TINY data, 2 epochs, 2 example images.
TINY_PIPELINE = {**TINY, "train.epochs": 2, "train.batch_size": 2, "train.num_workers": 0, "evaluate.examples": 2,
                 "prepare.workers": 1}


@pytest.fixture(scope="session")
def reproduced_project(tmp_path_factory) -> Path:
    """A git + DVC copy of the project with TINY_PIPELINE params, `dvc repro`'d and committed (two commits: the
    bare project, then its results). Read-only: copy it (`copy_project`) before changing anything."""
    repo = copy_repo(tmp_path_factory.mktemp("reproduced") / "repo", TINY_PIPELINE)
    run_dvc(repo, "repro")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "tiny repro")
    return repo


def copy_project(src: Path, dst: Path) -> Path:
    """A full copy of a git + DVC project (history, DVC cache and workspace)."""
    shutil.copytree(src, dst, symlinks=True)
    return dst
