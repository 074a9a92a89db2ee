"""The trained model as a registered DVC artifact (dvc.yaml `artifacts:`): listed, versioned by a git tag,
fetched from a clone with `dvc artifacts get`."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import REPO, copy_project, git, run_dvc

NAME = "offroad-segmenter"


def test_the_model_is_declared_as_a_model_artifact():
    artifact = yaml.safe_load((REPO / "dvc.yaml").read_text())["artifacts"][NAME]
    assert artifact["type"] == "model" and artifact["path"] == "models/best.pt"
    assert artifact["desc"].strip() and artifact["labels"]


def test_dvc_artifacts_get_fetches_the_model_from_a_clone(reproduced_project, tmp_path):
    repo = copy_project(reproduced_project, tmp_path / "repo")
    run_dvc(repo, "remote", "add", "-d", "storage", str(tmp_path / "remote"))
    git(repo, "commit", "-q", "-am", "DVC remote")
    run_dvc(repo, "push")
    git(repo, "tag", "-a", f"{NAME}@v1.0.0", "-m", "Register the tiny model")  # a GTO version tag
    gto = [str(Path(sys.executable).parent / "gto"), "show", "--json"]  # the model registry's listing
    listed = json.loads(subprocess.run(gto, cwd=repo, check=True, capture_output=True, text=True).stdout)
    assert listed[NAME]["version"] == "v1.0.0" and listed[NAME]["registered"]
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(repo), str(clone))

    run_dvc(tmp_path, "artifacts", "get", str(clone), NAME, "-o", str(tmp_path / "got/model.pt"))
    assert (tmp_path / "got/model.pt").read_bytes() == (repo / "models/best.pt").read_bytes()
