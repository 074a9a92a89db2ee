"""The frozen backbone may compute several train batches' features in one forward (train.backbone_batch):
the optimizer steps, their batches and the results stay those of one forward per batch."""

import pytest
import torch

from offroad.runtime import Run
from offroad.segmenter import build_model
from offroad.training import Outputs, RunInputs, fit
from tests.conftest import TINY, make_params, history_rows


def history(tmp_path, tiny_dataset, backbone_batch):
    params = make_params({**TINY, "train.epochs": 2, "train.batch_size": 2, "train.device": "cpu",
                          "loss.class_weighted": False, "train.backbone_batch": backbone_batch})
    torch.manual_seed(0)
    model = build_model(params.model, params.data.num_classes)
    steps = []
    real_features = model.features
    model.features = lambda images: steps.append(len(images)) or real_features(images)
    out = Outputs.inside(tmp_path)
    fit(model, params, RunInputs(tiny_dataset.train, tiny_dataset.val), Run.from_params(params, torch.device("cpu")),
        out, log=lambda _: None)
    return history_rows(out.live), steps


def test_chunked_backbone_trains_like_one_forward_per_batch(tmp_path, tiny_dataset):
    plain, plain_forwards = history(tmp_path / "plain", tiny_dataset, 0)
    chunked, chunked_forwards = history(tmp_path / "chunked", tiny_dataset, 4)
    # 6 train images: 3 batches of 2 per epoch; chunked, batches 1+2 share a forward, batch 3 has its own
    assert [n for n in plain_forwards if n != 1] == [2, 2, 2] * 2  # (val features: one image at a time)
    assert [n for n in chunked_forwards if n != 1] == [4, 2] * 2
    for a, b in zip(plain, chunked):
        assert a["epoch"] == b["epoch"] and a["lr"] == b["lr"]
        for key in ("train_loss", "val_loss", "train_iou", "val_iou", "val_acc"):
            assert float(b[key]) == pytest.approx(float(a[key]), abs=5e-3), key
