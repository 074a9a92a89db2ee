"""The train loop on tiny real-format data: recipes, schedules, early stopping, checkpoints, resume."""
import csv
import math

import numpy as np
import pytest
import torch

from unittest import mock

from offroad.artifacts import HISTORY_COLUMNS
from offroad.augment import build_augment
from offroad.losses import build_loss
from offroad.runtime import Dist, Run
from offroad.segmenter import build_model
from offroad.training import Outputs, TrainingError, epoch_batches, fit, lr_at
from tests.conftest import TINY, make_params

TRAIN = {"train.epochs": 3, "train.batch_size": 4, "train.num_workers": 0, "train.device": "cpu"}


def tiny_params(**overrides):
    return make_params({**TINY, **TRAIN, **overrides})


@pytest.fixture(scope="module")
def splits(tiny_dataset):
    return tiny_dataset.train, tiny_dataset.val


def run(tmp_path, splits, params, loss_fn=None, log=None):
    torch.manual_seed(0)
    model = build_model(params.model, params.data.num_classes)
    weights = torch.linspace(0.5, 2.0, params.data.num_classes) if params.loss.class_weighted else None
    out = Outputs(*(tmp_path / f"{k}.pt" for k in ("best", "final", "last")), tmp_path / "history.csv")
    run_ = Run(torch.device("cpu"), params.train.amp, params.data.num_classes, params.data.ignore_index)
    with mock.patch("offroad.training.build_loss", side_effect=(lambda *_: loss_fn) if loss_fn else build_loss):
        summary = fit(model, model.head, params, *splits, weights, run_, out, log=log or (lambda _: None))
    with open(out.history) as f:
        rows = list(csv.DictReader(f))
    return summary, rows, vars(out)


PHASE1 = {"optimizer.name": "sgd", "optimizer.lr": 1e-4, "scheduler.name": "constant", "augment.enabled": False,
          "loss.class_weighted": False, "train.amp": False, "train.checkpoint": "final",
          "train.early_stopping_patience": 0}


def test_cosine_and_constant_lr_follow_the_formulas():
    p = tiny_params(**{"train.epochs": 30, "optimizer.lr": 5e-4, "scheduler.min_lr": 1e-6})
    for e in range(31):
        expected = 1e-6 + (5e-4 - 1e-6) * (1 + math.cos(math.pi * e / 30)) / 2
        assert lr_at(e, p) == pytest.approx(expected, rel=1e-12)
    assert f"{lr_at(1, p):.3g}" == "0.000499" and lr_at(30, p) == pytest.approx(1e-6)  # the report's column
    c = tiny_params(**{"scheduler.name": "constant", "optimizer.lr": 1e-4})
    assert {lr_at(e, c) for e in range(5)} == {1e-4}


def test_epoch_batches_cover_every_image_once_and_ddp_shares_rebuild_them():
    def batches(*args):
        return [b for b, _ in epoch_batches(*args)]

    single = batches(10, 4, 3, 2, Dist())
    assert sorted(np.concatenate(single).tolist()) == list(range(10))
    assert [len(b) for b in single] == [4, 4, 2]
    shares = [batches(10, 4, 3, 2, Dist(r, 2)) for r in range(2)]
    for b, r0, r1 in zip(single, *shares):
        assert sorted(np.concatenate([r0, r1]).tolist()) == sorted(b.tolist())
    assert not np.array_equal(np.concatenate(single), np.concatenate(batches(10, 4, 3, 3, Dist())))


def test_loss_falls_and_history_has_the_report_columns(tmp_path, splits):
    p = tiny_params(**{"train.epochs": 4, "optimizer.lr": 2e-3, "augment.enabled": False, "train.amp": False})
    summary, rows, _ = run(tmp_path, splits, p)
    assert tuple(rows[0]) == HISTORY_COLUMNS
    losses = [float(r["train_loss"]) for r in rows]
    assert losses[-1] < losses[0] * 0.8
    assert summary["epochs_run"] == 4 and not summary["stopped_early"]


def test_phase1_recipe_caches_all_backbone_features(tmp_path, splits):
    p = tiny_params(**PHASE1)
    summary, rows, out = run(tmp_path, splits, p)
    n_train, n_val = len(splits[0]), len(splits[1])
    assert summary["backbone_forwards"] == n_train + n_val
    assert summary["backbone_forwards_saved"] == 3 * (n_train + n_val) - (n_train + n_val)
    assert {float(r["lr"]) for r in rows} == {1e-4}
    final = torch.load(out["final"], weights_only=True)
    assert final["epoch"] == 3 and final["params"]["optimizer"]["name"] == "sgd"


def test_early_stopping_stops_after_patience_epochs_without_improvement(tmp_path, splits):
    # lr this small leaves predictions unchanged, so val mIoU never beats epoch 1.
    p = tiny_params(**{"train.epochs": 10, "optimizer.lr": 1e-12, "scheduler.min_lr": 0.0, "augment.enabled": False,
                       "train.early_stopping_patience": 2})
    summary, rows, _ = run(tmp_path, splits, p)
    assert len({r["val_iou"] for r in rows}) == 1
    assert summary["epochs_run"] == 3 and summary["stopped_early"] and summary["best_epoch"] == 1


def test_best_checkpoint_is_the_highest_val_iou_and_final_the_last(tmp_path, splits):
    summary, rows, out = run(tmp_path, splits, tiny_params(**{"train.epochs": 4, "optimizer.lr": 3e-3}))
    val = [float(r["val_iou"]) for r in rows]
    best, final = (torch.load(out[k], weights_only=True) for k in ("best", "final"))
    assert best["epoch"] == summary["best_epoch"] == 1 + int(np.argmax(val))
    assert best["val_iou"] == pytest.approx(max(val)) and final["epoch"] == 4
    assert best["class_names"] == tiny_params().data.class_names


def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path, splits):
    p = tiny_params(**{"train.epochs": 4})
    _, uninterrupted, out_a = run(tmp_path / "a", splits, p)

    def killed_after_epoch_2(line):
        if line.startswith("epoch   2/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", splits, p, log=killed_after_epoch_2)
    lines = []
    summary, resumed, out_b = run(tmp_path / "b", splits, p, log=lines.append)
    assert "resume: continuing after epoch 2" in lines[0]
    assert summary["resumed_from_epoch"] == 2
    assert resumed == uninterrupted
    for k in ("best", "final"):
        a, b = (torch.load(o[k], weights_only=True) for o in (out_a, out_b))
        assert all(torch.equal(a["head"][n], b["head"][n]) for n in a["head"])

    lines.clear()
    run(tmp_path / "b", splits, tiny_params(**{"train.epochs": 4, "optimizer.lr": 1e-3}), log=lines.append)
    assert not any("continuing" in line for line in lines)  # a finished run is never resumed


def test_stale_resume_state_starts_fresh(tmp_path, splits):
    p = tiny_params(**{"train.epochs": 3})
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, splits, p, log=lambda line: (_ for _ in ()).throw(KeyboardInterrupt) if "epoch" in line else None)
    lines = []
    run(tmp_path, splits, tiny_params(**{"train.epochs": 3, "optimizer.lr": 1e-3}), log=lines.append)
    assert "made with other params, data or code; starting fresh" in lines[0]


def test_same_params_give_identical_history(tmp_path, splits):
    p = tiny_params(**{"train.epochs": 2})
    _, a, _ = run(tmp_path / "a", splits, p)
    _, b, _ = run(tmp_path / "b", splits, p)
    assert a == b


def test_nan_loss_stops_with_epoch_and_batch_and_keeps_last_good_state(tmp_path, splits):
    p = tiny_params(**{"train.epochs": 3, "augment.enabled": False})
    real = build_loss(p.loss, torch.ones(10), 255)
    calls = {"n": 0}

    def poisoned(logits, target):
        calls["n"] += 1
        loss = real(logits, target)
        return loss * float("nan") if calls["n"] == 4 else loss  # epoch 1: batches 1-2 + val 1; epoch 2 batch 1

    with pytest.raises(TrainingError, match=r"loss is nan at epoch 2, batch 1.*epoch 1"):
        run(tmp_path, splits, p, loss_fn=poisoned)
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 1


def test_augmentation_keeps_masks_aligned_with_images():
    p = tiny_params(**{"augment.blur.p": 0.0, "augment.color_jitter.p": 0.0, "augment.affine.p": 1.0})
    augment = build_augment(p.augment, ignore_index=255)
    blocks = np.random.default_rng(0).integers(0, 10, (7, 14))
    mask = np.kron(blocks, np.ones((16, 16), np.int64)).astype(np.uint8)
    image = np.repeat((mask * 25)[..., None], 3, axis=2).astype(np.uint8)  # colour encodes the class

    def agreement(img, m):
        valid = m != 255
        return (np.abs(img[..., 0][valid].astype(int) - m[valid].astype(int) * 25) <= 12).mean()

    changed = 0
    for seed in range(20):
        img, m = augment(image, mask, seed)
        changed += not np.array_equal(m, mask)
        assert set(np.unique(m)) <= set(range(10)) | {255}
        assert agreement(img, m) > 0.93  # only pixels on block edges blend under bilinear resampling
        assert agreement(img, np.roll(m, 8, axis=1)) < 0.7  # a mask off by half a block fails the check
    assert changed >= 15
