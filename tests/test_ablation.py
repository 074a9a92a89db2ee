"""The ablation table (python -m offroad.ablation): shares of the gain against closed-form IoUs, and intervals
that say when a share is noise. The table built from real queued experiments: tests/test_dvc_workflow.py."""
from __future__ import annotations

import numpy as np
import pytest

from offroad import ablation, review
from tests.test_review import image_cms, side
from tests.test_review import rows as rows_of

N = 30


def iou(accuracy: float) -> float:
    """image_cms gives each class tp = a·P, P truths and P predictions: IoU = a / (2 − a), on every class."""
    return accuracy / (2 - accuracy)


def run(rev: str, accuracy: float, spread: np.ndarray, **params) -> review.Group:
    made = side(rev, image_cms(accuracy + spread))
    made.runs[0].params.update(params)
    return made


def test_shares_match_closed_form_ious_and_say_what_was_reverted():
    flat = np.zeros(N)
    full, base = run("phase2", 0.9, flat), run("phase1", 0.5, flat)
    parts = [run("no-adamw", 0.8, flat, **{"optimizer.name": "sgd"}), run("no-amp", 0.9, flat)]
    rows, whole = ablation.table(full, base, parts)
    gain = iou(0.9) - iou(0.5)
    assert whole["gain"][0] == pytest.approx(gain)
    assert rows[0].share[0] == pytest.approx((iou(0.9) - iou(0.8)) / gain)
    assert rows[0].lost == pytest.approx((iou(0.9) - iou(0.8),) * 3)  # identical images: no spread to resample
    assert rows[0].reverted == {"optimizer.name": "sgd"}
    assert rows[1].share == pytest.approx((0, 0, 0)) and rows[1].reverted == {}
    assert whole["sum"][0] == pytest.approx(rows[0].share[0])
    text = ablation.markdown(rows, whole, ablation.Compared("phase2", "phase1", "miou", 1000, 0))
    cells = rows_of(text)
    assert cells["no-adamw"][:3] == ["1", "optimizer.name=sgd", f"{iou(0.8):.4f}"]
    assert cells["no-adamw"][-1] == "~40 %" and cells["no-amp"][-1] == "—"
    assert cells["no-adamw"][5] == "needed" and cells["no-amp"][5] == "within noise"


def test_a_part_inside_the_noise_gets_an_interval_across_zero():
    rng = np.random.default_rng(0)
    spread = rng.uniform(-0.3, 0.05, N)  # images of very different difficulty
    full, base = run("phase2", 0.9, spread), run("phase1", 0.5, spread)
    # reverting costs a little on some images and gains a little on others: no real effect
    jitter = run("no-schedule", 0.9, spread + rng.choice([-0.02, 0.02], N))
    real = run("no-adamw", 0.75, spread)
    rows, whole = ablation.table(full, base, [jitter, real])
    assert whole["gain"][1] > 0
    noise, needed = rows
    assert noise.share[1] < 0 < noise.share[2] and ablation.verdict(noise.lost) == "within noise"
    assert 0 < needed.share[1] <= needed.share[0] <= needed.share[2] and ablation.verdict(needed.lost) == "needed"
    assert whole["sum"][1] <= whole["sum"][0] <= whole["sum"][2]


def test_only_the_images_every_run_scored_are_compared():
    full, base = run("phase2", 0.9, np.zeros(N)), run("phase1", 0.5, np.zeros(N))
    part = run("no-epochs", 0.7, np.zeros(N))
    names, cms = part.runs[0].per_image
    part.runs[0].per_image = (names[:-5], cms[:-5])
    _, whole = ablation.table(full, base, [part])
    assert whole["images"] == N - 5


def test_a_run_without_per_image_data_is_named():
    full, base = run("phase2", 0.9, np.zeros(N)), side("phase1", None)
    with pytest.raises(review.ReviewError, match="`phase1` has no per-image data"):
        ablation.table(full, base, [])


def test_default_parts_are_the_experiment_files():
    assert ablation.default_parts() == ["no-adamw", "no-amp", "no-augment", "no-class_weights", "no-epochs",
                                        "no-schedule", "no-selection"]


def test_without_a_gain_there_is_no_share():
    same = np.zeros(N)
    full, base, part = run("phase2", 0.7, same), run("phase1", 0.7, same), run("no-adamw", 0.6, same)
    rows, whole = ablation.table(full, base, [part])
    text = ablation.markdown(rows, whole, ablation.Compared("phase2", "phase1", "miou", 1000, 0))
    assert rows_of(text)["no-adamw"][4] == "—" and "The gain itself is within noise" in text
