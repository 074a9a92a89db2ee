"""The data stages write the same bytes whatever SIMD level numpy and OpenCV dispatch to: their optimised
kernels are switched off one by one through the environment, as on a CPU that lacks them."""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import cv2
import yaml
from numpy._core import _multiarray_umath as npy

from tests.conftest import REPO, TINY, copy_repo, git, run_dvc


def dispatched() -> dict[str, str]:
    """Environment that turns off every optional SIMD kernel numpy and OpenCV found on this CPU."""
    opencv = [f.strip("*?") for f in cv2.getCPUFeaturesLine().split() if f.startswith("*") and not f.endswith("?")]
    numpy = [f for f in npy.__cpu_dispatch__ if npy.__cpu_features__.get(f)]
    return {"OPENCV_CPU_DISABLE": ",".join(opencv), "NPY_DISABLE_CPU_FEATURES": " ".join(numpy)}


def stage_hashes(repo: Path, env: dict[str, str]) -> dict[str, str]:
    """sha256 of every file `synthesize` and `prepare` write, run in `repo` under `env`."""
    for stage in ("synthesize", "prepare"):
        subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=repo, env={**os.environ, **env}, check=True,
                       capture_output=True)
    files = sorted(p for p in (repo / "data").rglob("*") if p.is_file())
    return {str(p.relative_to(repo)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_tiny_data_is_byte_identical_without_simd(tmp_path):
    disabled = dispatched()
    assert disabled["OPENCV_CPU_DISABLE"] or disabled["NPY_DISABLE_CPU_FEATURES"], "no SIMD kernels to turn off"
    repo = copy_repo(tmp_path / "repo", {**TINY, "synthetic.width": 320, "synthetic.height": 180,
                                         "data.image_size": [168, 98]})
    native = stage_hashes(repo, {})
    assert len(native) == 2 * (6 + 3 + 4) + 3 * 3  # the PNG pairs, then per split images, masks and split.json
    assert stage_hashes(repo, disabled) == native
    for name, value in disabled.items():  # each library on its own
        assert stage_hashes(repo, {name: value}) == native, name


def test_default_data_reproduces_the_committed_lock(tmp_path):
    """`dvc repro prepare` of the repository's own params writes the hashes committed in dvc.lock."""
    repo = copy_repo(tmp_path / "repo")
    (repo / "dvc.lock").write_bytes((REPO / "dvc.lock").read_bytes())
    git(repo, "add", "dvc.lock")
    git(repo, "commit", "-q", "-m", "lock")
    run_dvc(repo, "repro", "--force", "prepare")
    stages = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    committed = yaml.safe_load((REPO / "dvc.lock").read_text())["stages"]
    for stage in ("synthesize", "prepare"):
        assert stages[stage]["outs"] == committed[stage]["outs"], stage
