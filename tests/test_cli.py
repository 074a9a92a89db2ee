"""The command lines: every stage answers --help from dvc.yaml and refuses arguments; the package installs
with its console scripts; long loops report progress without a terminal."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from offroad.progress import progress
from tests.conftest import REPO

STAGES = list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
SCRIPTS = ("offroad-predict", "offroad-review", "offroad-ablation", "offroad-evidence", "offroad-docs")


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_answers_help_and_refuses_arguments(stage):
    shown = subprocess.run([sys.executable, "-m", f"stages.{stage}", "--help"], cwd=REPO, capture_output=True,
                           text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith(f"usage: python -m stages.{stage}   (or: dvc repro {stage})")
    assert "its configuration is params.yaml" in shown.stdout and "  writes: " in shown.stdout
    refused = subprocess.run([sys.executable, "-m", f"stages.{stage}", "--epochs", "3"], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.strip() == (f"error: stages.{stage} takes no arguments (got --epochs 3); its configuration "
                                      "is params.yaml: edit it, or `dvc exp run -S key=value`; --help says what it reads")


def test_the_package_installs_with_its_console_scripts(tmp_path):
    """A real (non-editable) pip install of the project into a prefix; its scripts run from another folder."""
    prefix = tmp_path / "prefix"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--prefix", str(prefix), str(REPO)], check=True, capture_output=True, timeout=600)
    site = next(prefix.glob("lib/python*/site-packages"))
    assert (site / "offroad" / "review.py").is_file() and not (site / "stages").exists()
    env = {**os.environ, "PYTHONPATH": str(site)}
    for script in SCRIPTS:
        shown = subprocess.run([str(prefix / "bin" / script), "--help"], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=120)
        assert shown.returncode == 0 and "usage:" in shown.stdout, (script, shown.stderr)
    imported = subprocess.run([sys.executable, "-c", "import offroad; print(offroad.__file__)"], cwd=tmp_path,
                              env=env, capture_output=True, text=True)
    assert Path(imported.stdout.strip()).parent == site / "offroad"  # the installed copy, not the checkout


def test_without_a_terminal_progress_is_a_line_every_tenth(capsys):
    assert list(progress(iter(range(20)), 20, "prepare val")) == list(range(20))
    lines = capsys.readouterr().err.splitlines()  # pytest's capture is not a terminal, as under `dvc queue`
    assert len(lines) == 10
    assert lines[0].startswith("prepare val: 2/20 img (10 %), ") and lines[-1].startswith("prepare val: 20/20 img (100 %), ")
    assert all(line.endswith(" s left") for line in lines)
