"""`train` under torchrun: 2 CPU processes (gloo) give the single-process history, up to float noise."""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from stages import class_weights, prepare, synthesize
from tests.conftest import TINY, write_params

# 5 train images in batches of 2: the last global batch has 1 image, so rank 1's share of it is empty
# (it must still join the gradient all-reduce); 3 val images split 2 + 1. Class-weighted CE with uneven
# shares is where a per-process loss mean would differ from the single-process one.
PARAMS = {**TINY, "synthetic.train": 5, "synthetic.val": 3, "train.epochs": 3, "train.batch_size": 2,
          "train.num_workers": 0, "train.device": "cpu", "train.amp": False, "train.early_stopping_patience": 0,
          "augment.enabled": True, "loss.class_weighted": True}


def train(repo, *launcher: str) -> tuple[list[dict], dict, dict]:
    for f in (repo / "models").glob("*.pt"):
        f.unlink()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    result = subprocess.run([sys.executable, *launcher, "-m", "stages.train"], cwd=repo, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    with open(repo / "plots/train/history.csv") as f:
        history = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    head = torch.load(repo / "models/final.pt", weights_only=True)["head"]
    return history, json.loads((repo / "metrics/train.json").read_text()), head


def test_two_gloo_processes_train_like_one(repo_copy, monkeypatch):
    write_params(repo_copy / "params.yaml", PARAMS)
    monkeypatch.chdir(repo_copy)
    for stage in (synthesize, prepare, class_weights):
        stage.main()

    single, single_summary, single_head = train(repo_copy)
    ddp, ddp_summary, ddp_head = train(repo_copy, "-m", "torch.distributed.run", "--standalone",
                                       "--nproc_per_node=2")

    assert [r["epoch"] for r in ddp] == [r["epoch"] for r in single] == [1, 2, 3]
    for a, b in zip(single, ddp):
        for column, value in a.items():
            assert b[column] == pytest.approx(value, rel=1e-4, abs=1e-5), (a["epoch"], column)
    for name, tensor in single_head.items():
        torch.testing.assert_close(ddp_head[name], tensor, rtol=1e-3, atol=1e-4)  # Adam amplifies noise in ~0 grads

    assert (single_summary["world_size"], ddp_summary["world_size"]) == (1, 2)
    # every epoch: 5 train forwards (6 under DDP: rank 1 runs a zero-weight image for its empty share);
    # the 3 val features once, reused in epochs 2 and 3
    assert (single_summary["backbone_forwards"], single_summary["backbone_forwards_saved"]) == (18, 6)
    assert (ddp_summary["backbone_forwards"], ddp_summary["backbone_forwards_saved"]) == (21, 3)
    assert not list(repo_copy.glob("**/.*.tmp"))  # rank 1 wrote nothing half-way
