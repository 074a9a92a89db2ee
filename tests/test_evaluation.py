"""One evaluation definition: the evaluate stage scores the kept checkpoint exactly as training scored it on
the val split that epoch, whatever evaluate.batch_size is, in fp32 and under bf16 autocast (whose CPU kernels
round differently for different batch shapes: evaluation runs the backbone one image at a time)."""
import json
from pathlib import Path
import shutil

import pytest

from stages import class_weights, evaluate, train
from tests.conftest import TINY, write_params, history_rows

PARAMS = {**TINY, "train.epochs": 2, "train.batch_size": 2, "train.device": "cpu", "evaluate.examples": 1}


@pytest.mark.parametrize("amp", [False, True])
def test_evaluate_json_equals_the_history_row_of_the_kept_epoch(tiny_dataset, tmp_path, monkeypatch, amp):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_dataset.prepared, "data/prepared")
    write_params("params.yaml", {**PARAMS, "train.amp": amp})
    class_weights.main()
    train.main()
    history = {r["epoch"]: r for r in history_rows(Path("dvclive"))}
    for checkpoint in ("best", "final"):
        for batch_size in (1, 3):
            write_params("params.yaml", {**PARAMS, "train.amp": amp, "train.checkpoint": checkpoint,
                                         "evaluate.batch_size": batch_size})
            evaluate.main()
            scored = json.loads(open("metrics/evaluate.json").read())
            report, row = scored["val"], history[scored["epoch"]]
            for metric, column in [("loss", "val_loss"), ("miou", "val_iou"), ("mdice", "val_dice"),
                                   ("pixel_accuracy", "val_acc")]:
                assert report[metric] == pytest.approx(float(row[column]), abs=1e-5), (checkpoint, batch_size, metric)
