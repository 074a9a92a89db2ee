"""The train loop on tiny real-format data: recipes, schedules, early stopping, checkpoints, resume."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from types import SimpleNamespace
from unittest import mock

from offroad import artifacts, atomic
from offroad.artifacts import HISTORY_COLUMNS
from offroad.augment import build_augment
from offroad.errors import PipelineError
from offroad.evaluation import Evaluation
from offroad.losses import build_loss
from offroad.runtime import Dist, Run
from offroad.segmenter import build_model
from offroad.training import (BackboneWork, Outputs, RunInputs, State, TrainingError, epoch_batches, fingerprint, fit,
                               history_row, lr_at, record_epoch, run_summary)
from tests.conftest import TINY, make_params, history_rows

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
    out = Outputs.inside(tmp_path)
    run_ = Run.from_params(params, torch.device("cpu"))
    with mock.patch("offroad.training.build_loss", side_effect=(lambda *_: loss_fn) if loss_fn else build_loss):
        summary = fit(model, params, RunInputs(*splits, weights), run_, out, log=log or (lambda _: None))
    rows = history_rows(out.live)
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
    # each epoch's step sizes are checked exactly elsewhere (test_ddp_scaling, the recorded run below); here
    # the whole loop must improve the head every epoch, on the train and the val split
    for side in ("train", "val"):
        losses = [float(r[f"{side}_loss"]) for r in rows]
        assert all(b < a for a, b in zip(losses, losses[1:])), (side, losses)
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
    lines = []
    summary, rows, _ = run(tmp_path, splits, p, log=lines.append)
    assert len({r["val_iou"] for r in rows}) == 1
    assert summary["epochs_run"] == 3 and summary["stopped_early"] and summary["best_epoch"] == 1
    assert lines[-1] == (f"early stopping: no val mIoU gain in 2 epochs after epoch 1 ({rows[0]['val_iou']:.4f}); "
                         "stopped after epoch 3 of 10")


def test_best_checkpoint_is_the_highest_val_iou_and_final_the_last(tmp_path, splits):
    summary, rows, out = run(tmp_path, splits, tiny_params(**{"train.epochs": 4, "optimizer.lr": 3e-3}))
    val = [float(r["val_iou"]) for r in rows]
    best, final = (torch.load(out[k], weights_only=True) for k in ("best", "final"))
    assert best["epoch"] == summary["best_epoch"] == 1 + int(np.argmax(val))
    assert best["val_iou"] == pytest.approx(max(val)) and final["epoch"] == 4
    assert final["val_iou"] == pytest.approx(val[-1]) and val[-1] != val[-2]
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

    poisoned.pixel_weight = real.pixel_weight

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


# --- selection and bookkeeping against independent numbers ---------------------------------------------------
# One step per epoch (batch 8 > 6 train images), fp32, no augmentation: the train statistics of epoch e are
# those of the head after epoch e - 1 on all train images, so everything in the logged history can be recomputed
# here with plain torch + numpy from the heads the loop held.
RECORDED = {"train.epochs": 8, "train.batch_size": 8, "optimizer.lr": 1e-2, "scheduler.min_lr": 1e-3,
            "augment.enabled": False, "train.amp": False, "train.early_stopping_patience": 1}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, splits):
    """A finished run plus what the loop held: the head before training and after every epoch, and the lr the
    optimizer had at every step (read from its param group by a step pre-hook)."""
    import offroad.training as training
    tmp = tmp_path_factory.mktemp("recorded")
    p = tiny_params(**RECORDED)
    heads, step_lrs = [], []
    make_optimizer, record_epoch = training.make_optimizer, training.record_epoch

    def recording_optimizer(*args):
        opt = make_optimizer(*args)
        opt.register_step_pre_hook(lambda o, *_: step_lrs.append(o.param_groups[0]["lr"]))
        return opt

    def recording_epoch(state, row, t):
        improved = record_epoch(state, row, t)
        heads.append({k: v.clone() for k, v in t.model.head.state_dict().items()})
        return improved

    torch.manual_seed(0)
    initial = {k: v.clone() for k, v in build_model(p.model, p.data.num_classes).head.state_dict().items()}
    with mock.patch.object(training, "make_optimizer", side_effect=recording_optimizer), \
            mock.patch.object(training, "record_epoch", side_effect=recording_epoch):
        summary, rows, out = run(tmp, splits, p)
    return {"params": p, "summary": summary, "rows": rows, "out": out, "heads": [initial] + heads,
            "step_lrs": step_lrs}


def independent_scores(params, head_state, split):
    """(loss, mIoU, mDice, acc) of a head on a split: features -> head -> bilinear upsample -> argmax, the
    confusion matrix counted with numpy, the class-weighted cross-entropy in float64."""
    K, ignore = params.data.num_classes, params.data.ignore_index
    model = build_model(params.model, K)
    model.head.load_state_dict(head_state)
    with torch.no_grad():
        logits = F.interpolate(model.head(backbone_features(params, split)), size=split.masks.shape[1:],
                               mode="bilinear", align_corners=False)
    target = np.asarray(split.masks).astype(np.int64)
    valid = target != ignore
    log_p = torch.log_softmax(logits.double(), 1).permute(0, 2, 3, 1).numpy()[valid]  # [pixels, K]
    t = target[valid]
    w = np.linspace(0.5, 2.0, K)[t]  # the weights `run` passes
    loss = float((w * -log_p[np.arange(len(t)), t]).sum() / w.sum())
    pred = logits.argmax(1).numpy()[valid]
    cm = np.bincount(t * K + pred, minlength=K * K).reshape(K, K).astype(float)
    tp, gt, pr = np.diag(cm), cm.sum(1), cm.sum(0)
    present = gt > 0
    iou = (tp / (gt + pr - tp))[present].mean()
    dice = (2 * tp / (gt + pr))[present].mean()
    return loss, iou, dice, tp.sum() / cm.sum()


FEATURES = {}


def backbone_features(params, split):
    """The frozen backbone's features of a whole split, computed once per split."""
    key = id(split)
    if key not in FEATURES:
        with torch.no_grad():
            model = build_model(params.model, params.data.num_classes)
            FEATURES[key] = model.features(torch.from_numpy(np.array(split.images)))
    return FEATURES[key]


def row_scores(row, side):
    return [float(row[f"{side}_{k}"]) for k in ("loss", "iou", "dice", "acc")]


def test_recorded_run_stopped_early_after_its_best_epoch(recorded):
    # the precondition of the checkpoint tests below: best and final are different epochs
    s = recorded["summary"]
    assert s["stopped_early"] and s["best_epoch"] < s["epochs_run"] == len(recorded["rows"])
    val = [float(r["val_iou"]) for r in recorded["rows"]]
    assert val[s["best_epoch"] - 1] > max(val[s["best_epoch"]:])


@pytest.mark.parametrize("which", ["best", "final"])
def test_saved_checkpoints_score_what_history_says_for_their_epoch(recorded, splits, which):
    ckpt = torch.load(recorded["out"][which], weights_only=True)
    s = recorded["summary"]
    assert ckpt["epoch"] == (s["best_epoch"] if which == "best" else s["epochs_run"])
    row = recorded["rows"][ckpt["epoch"] - 1]
    got = independent_scores(recorded["params"], ckpt["head"], splits[1])
    assert got == pytest.approx(row_scores(row, "val"), rel=1e-5, abs=2e-6)
    assert ckpt["val_iou"] == pytest.approx(float(row["val_iou"]), abs=1e-6)


@pytest.mark.parametrize("epoch", [1, 2])
def test_history_row_equals_train_and_val_recomputed_outside_the_loop(recorded, splits, epoch):
    heads, row = recorded["heads"], recorded["rows"][epoch - 1]
    # one step per epoch: the train forward pass used the head as it was before the epoch
    train = independent_scores(recorded["params"], heads[epoch - 1], splits[0])
    val = independent_scores(recorded["params"], heads[epoch], splits[1])
    assert train == pytest.approx(row_scores(row, "train"), rel=1e-5, abs=2e-6)
    assert val == pytest.approx(row_scores(row, "val"), rel=1e-5, abs=2e-6)
    assert abs(train[1] - val[1]) > 1e-3  # a swap of train and val would show


def test_optimizer_steps_with_the_cosine_lr_of_their_epoch(recorded):
    p, rows = recorded["params"], recorded["rows"]
    epochs, lr, low = p.train.epochs, p.optimizer.lr, p.scheduler.min_lr
    cosine = [low + (lr - low) * (1 + math.cos(math.pi * e / epochs)) / 2 for e in range(epochs + 1)]
    assert recorded["step_lrs"] == pytest.approx(cosine[:len(rows)], rel=1e-12)  # one step per epoch
    assert [float(r["lr"]) for r in rows] == pytest.approx(cosine[1:len(rows) + 1], rel=1e-5)  # the report's column



def test_fingerprint_covers_class_weights_and_every_code_file_of_the_stage(tmp_path, splits, monkeypatch):
    import shutil
    from offroad import codebase
    p = tiny_params()
    w = torch.linspace(0.5, 2.0, 10)

    def fp(weights):
        return fingerprint(p, RunInputs(*splits, weights, codebase.source_digest("stages.train")))

    base = fp(w)
    assert fp(w.clone()) == base
    assert fp(w * 2) != base
    assert fp(None) != base
    files = codebase.import_closure("stages.train")
    assert {"stages/train.py", "offroad/training.py", "offroad/losses.py", "offroad/segmenter.py"} <= {str(f) for f in files}
    for f in files:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(codebase.ROOT / f, tmp_path / f)
    monkeypatch.setattr(codebase, "ROOT", tmp_path)
    assert fp(w) == base
    for f in files:
        original = (tmp_path / f).read_bytes()
        (tmp_path / f).write_bytes(original + b"\n# changed\n")
        assert fp(w) != base, f
        (tmp_path / f).write_bytes(original)


def test_a_tie_keeps_the_earlier_best_and_the_state_holds_the_optimizer():
    params = make_params({**TINY, "model.head_channels": 8})
    model = build_model(params.model, params.data.num_classes)
    optimizer = torch.optim.AdamW(model.head.parameters(), lr=1e-3)
    model.head(torch.randn(1, 384, 2, 3)).sum().backward()
    optimizer.step()  # AdamW state (step, moments) now exists
    state = State("fp")
    for epoch, iou in ((1, 0.3), (2, 0.5), (3, 0.5), (4, 0.4)):
        with torch.no_grad():
            next(model.head.parameters()).add_(1.0)  # a different head every epoch
        trainer = SimpleNamespace(model=model, optimizer=optimizer, scaler=torch.amp.GradScaler("cpu", enabled=False))
        improved = record_epoch(state, {"epoch": epoch, "val_iou": iou}, trainer)
        assert improved == (epoch in (1, 2))
        if epoch == 2:
            best = {k: v.clone() for k, v in model.head.state_dict().items()}
    assert (state.best_epoch, state.best_val_iou, state.epoch) == (2, 0.5, 4)
    assert all(torch.equal(state.best_head[k], v) for k, v in best.items())
    saved = state.optimizer
    assert saved["state"] and all(torch.equal(saved["state"][i]["exp_avg"], optimizer.state_dict()["state"][i]["exp_avg"])
                                  for i in saved["state"])


def test_a_process_left_without_images_in_the_last_batch_runs_image_0_uncounted():
    shares = [epoch_batches(5, 2, seed=0, epoch=3, dist=Dist(rank, 2)) for rank in (0, 1)]
    assert [counted for _, counted in shares[0]] == [True] * 3
    assert [counted for _, counted in shares[1]] == [True, True, False]
    assert shares[1][-1][0].tolist() == [0] and shares[1][-1][0].dtype == np.int64  # an index array
    counted = [i for share in shares for batch, ok in share if ok for i in batch.tolist()]
    assert sorted(counted) == list(range(5))


def test_run_summary_counts_this_run_s_epochs_and_the_forwards_caching_saved():
    state = State("f", epoch=7, best_epoch=5, best_val_iou=0.4)
    # resumed after epoch 3: 4 epochs of 8 train + 2 val images would be 40 forwards; 12 ran, 6 of them cached
    work = BackboneWork(forwards=12.4, cached=6, cached_seconds=3.1, train_images=8, val_images=2)
    assert run_summary(state, 10, 3, 16.26, work) == {
        "best_epoch": 5, "best_val_iou": 0.4, "epochs_run": 7, "stopped_early": True, "resumed_from_epoch": 3,
        "train_seconds": 16.3, "images_per_second": 1.97, "backbone_forwards": 12, "backbone_forwards_saved": 28,
        "backbone_seconds_saved": 14.5}  # 28 x 3.1 / 6 = 14.47
    done = run_summary(State("f", epoch=10), 10, 0, 0.0, BackboneWork(20, 0, 0.0, 2, 0))
    assert not done["stopped_early"] and done["backbone_forwards_saved"] == 0
    assert done["images_per_second"] is None and done["backbone_seconds_saved"] is None


def test_the_models_and_run_facts_of_a_run_are_written_as_one_set(tmp_path, splits, monkeypatch):
    p = tiny_params(**{"train.epochs": 2, "augment.enabled": False})
    run(tmp_path, splits, p)
    done = {name: (tmp_path / name).read_bytes() for name in ("best.pt", "final.pt", "run.json")}
    facts = json.loads(done["run.json"])
    assert facts["device"] == "cpu" and "epochs_run" not in facts  # a result: DVCLive's summary has it
    assert {"device", "world_size", "precision", "attention", "backbone", "train_seconds"} <= set(facts)

    def full_disk(path, summary):  # the last file of the set does not fit
        with atomic.atomic_path(path) as tmp:
            tmp.write_bytes(b"{")
            raise OSError(28, "No space left on device", str(tmp))

    other = tiny_params(**{"train.epochs": 2, "augment.enabled": False, "train.seed": 1})
    with monkeypatch.context() as m:
        m.setattr(artifacts, "write_run_facts", full_disk)
        with pytest.raises(PipelineError, match="run.json: cannot write"):
            run(tmp_path, splits, other)
    assert {name: (tmp_path / name).read_bytes() for name in done} == done  # the previous run's set, whole
    last = torch.load(tmp_path / "last.pt", weights_only=False)
    assert last["epoch"] == 2 and not last["complete"]  # the new run's resume state: it finishes on the rerun
    lines = []
    run(tmp_path, splits, other, log=lines.append)
    assert lines[0].startswith("resume: continuing after epoch 2")
    assert torch.load(tmp_path / "best.pt", weights_only=False)["params"]["train"]["seed"] == 1


def test_history_row_scores_both_splits_to_six_digits():
    train = Evaluation(1 / 3, torch.tensor([[2, 1], [0, 3]]), np.zeros(0))  # IoU 2/3 and 3/4, Dice 4/5 and 6/7
    val = Evaluation(2.0, torch.tensor([[1, 0], [0, 1]]), np.zeros(0))
    row = history_row(4, 1 / 3 * 1e-3, train, val)
    assert row == {"epoch": 4, "train_loss": 0.333333, "val_loss": 2.0, "train_iou": round((2 / 3 + 3 / 4) / 2, 6),
                   "val_iou": 1.0, "train_dice": round((4 / 5 + 6 / 7) / 2, 6), "val_dice": 1.0,
                   "train_acc": round(5 / 6, 6), "val_acc": 1.0, "lr": 0.000333333}
