"""The full-scale rehearsal bench (bench/full_scale.py) at a reduced size: every step runs as its stage would,
and the table reports what the outputs hold."""
from __future__ import annotations

import json

import yaml

from bench import full_scale
from offroad.config import validate
from tests.conftest import TINY, train_summary


def test_reduced_rehearsal_runs_every_step_and_measures_it(tmp_path):
    work = tmp_path / "work"
    overrides = [f"{k}={json.dumps(v)}" for k, v in TINY.items() ]
    text = full_scale.main(["--train", "4", "--val", "2", "--test", "2", "--workdir", str(work), *sum((["-S", o] for o in overrides), [])])
    assert len(list((work / "data/synthetic/train/Color_Images").iterdir())) == 4
    assert len(list((work / "data/synthetic/val/Segmentation").iterdir())) == 2
    assert len(list((work / "data/synthetic/test/Segmentation").iterdir())) == 2
    # the last step ran the Phase 1 recipe for one epoch, on the reduced data
    params = validate(yaml.safe_load((work / "params.yaml").read_text()), "rehearsal params")
    assert (params.optimizer.name, params.train.amp, params.train.epochs) == ("sgd", False, 1)
    summary = train_summary(work)
    assert summary["epochs_run"] == 1 and summary["precision"] == "fp32 (train.amp: false)"
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| ") and "step" not in line]
    assert [r[0].lstrip("| ") for r in rows] == ["synthesize", "prepare", "class_weights", "train: 1 Phase 2 epoch",
                                                 "train: 1 Phase 1 epoch"]
    # Phase 1 caches train and val features in fp32: 6 images x (112/14 x 56/14) tokens x 384 x 4 bytes
    assert full_scale.feature_cache_gb(params, 6) * 1024 ** 3 == 6 * 8 * 4 * 384 * 4
    phase2 = params.model_copy(update={"train": params.train.model_copy(update={"amp": True})})
    assert full_scale.feature_cache_gb(phase2, 6) * 1024 ** 3 == 6 * 8 * 4 * 384 * 2
    assert all(float(r[4]) > 0.05 for r in rows)  # every stage is a python process holding torch or numpy
    assert "Projected 30-epoch Phase 2 train stage" in text
