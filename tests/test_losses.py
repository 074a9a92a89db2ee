"""Losses against hand-computed values; class weights from the class_weights.json format."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from offroad.errors import PipelineError
from offroad.artifacts import read_class_weights as load_class_weights
from offroad.losses import build_loss, pixel_weight
from offroad.config import load_params

REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
IGNORE = 255
# 3 classes, 4 pixels in a 1x2x2 image; the last pixel is ignored, class 1 never occurs
LOGITS = np.array([[2.0, 0.5, -1.0],   # pixel 0, label 0
                   [0.0, 1.0, 3.0],    # pixel 1, label 2
                   [1.5, -0.5, 0.5],   # pixel 2, label 0
                   [9.0, -9.0, 0.0]])  # pixel 3, ignored
LABELS = [0, 2, 0, IGNORE]
WEIGHTS = np.array([0.5, 2.0, 3.0])


def tensors(logits=LOGITS, labels=LABELS):
    return (torch.tensor(logits, dtype=torch.float32).T.reshape(1, 3, 2, 2),
            torch.tensor(labels).reshape(1, 2, 2))


def softmax_rows(logits):
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def loss_params(**changes):
    return load_params(REPO_PARAMS).loss.model_copy(update=changes)


def expected_focal(gamma, weights):
    p = softmax_rows(LOGITS)
    num = den = 0.0
    for i, y in enumerate(LABELS[:3]):
        a = 1.0 if weights is None else weights[y]
        num += a * (1 - p[i, y]) ** gamma * -math.log(p[i, y])
        den += a
    return num / den


def expected_dice():
    p = softmax_rows(LOGITS)[:3]  # ignored pixel excluded
    dice = []
    for k in (0, 2):  # classes present in the target
        y = np.array([label == k for label in LABELS[:3]], dtype=float)
        dice.append(2 * (p[:, k] * y).sum() / (p[:, k].sum() + y.sum()))
    return float(np.mean([1 - d for d in dice]))


@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy(weighted):
    p = softmax_rows(LOGITS)
    nll = [-math.log(p[0, 0]), -math.log(p[1, 2]), -math.log(p[2, 0])]
    w = [WEIGHTS[0], WEIGHTS[2], WEIGHTS[0]] if weighted else [1, 1, 1]
    expected = sum(a * b for a, b in zip(w, nll)) / sum(w)
    loss = build_loss(loss_params(name="cross_entropy", class_weighted=weighted), torch.tensor(WEIGHTS), IGNORE)
    assert loss(*tensors()).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("gamma", [0.0, 2.0])
def test_focal_dice(weighted, gamma):
    params = loss_params(name="focal_dice", class_weighted=weighted, focal_gamma=gamma, focal_weight=0.7,
                         dice_weight=1.3)
    loss = build_loss(params, torch.tensor(WEIGHTS), IGNORE)
    expected = 0.7 * expected_focal(gamma, WEIGHTS if weighted else None) + 1.3 * expected_dice()
    assert loss(*tensors()).item() == pytest.approx(expected, rel=1e-6)


def test_focal_with_gamma_zero_is_weighted_cross_entropy():
    logits, target = torch.randn(2, 4, 5, 6), torch.randint(0, 4, (2, 5, 6))
    target[0, :2] = IGNORE
    w = torch.tensor([0.1, 1.0, 5.0, 0.5])
    focal = build_loss(loss_params(name="focal_dice", focal_gamma=0.0, focal_weight=1.0, dice_weight=0.0), w, IGNORE)
    ce = build_loss(loss_params(name="cross_entropy"), w, IGNORE)
    torch.testing.assert_close(focal(logits, target), ce(logits, target))


@pytest.mark.parametrize("name", ["cross_entropy", "focal_dice"])
def test_ignored_pixels_do_not_matter(name):
    loss = build_loss(loss_params(name=name), torch.tensor(WEIGHTS), IGNORE)
    logits, target = tensors()
    other = logits.clone()
    other[0, :, 1, 1] = torch.tensor([-5.0, 7.0, 1.0])  # the ignored pixel
    assert loss(logits, target).item() == pytest.approx(loss(other, target).item(), rel=1e-6)
    logits.requires_grad_(True)
    loss(logits, target).backward()
    assert not logits.grad[0, :, 1, 1].any() and logits.grad[0, :, 0, 0].any()


@pytest.mark.parametrize("name", ["cross_entropy", "focal_dice"])
def test_a_weighted_mean_does_not_change_when_every_class_weight_is_scaled(name):
    small = build_loss(loss_params(name=name), torch.tensor(WEIGHTS) * 1e-3, IGNORE)  # weights summing below 1
    assert small(*tensors()).item() == pytest.approx(build_loss(loss_params(name=name), torch.tensor(WEIGHTS),
                                                                IGNORE)(*tensors()).item(), rel=1e-5)


def test_dice_averages_over_the_classes_present_even_one():
    labels = [2, 2, 2, IGNORE]
    loss = build_loss(loss_params(name="focal_dice", focal_weight=0.0, dice_weight=1.0), torch.tensor(WEIGHTS), IGNORE)
    p = softmax_rows(LOGITS)[:3, 2]
    assert loss(*tensors(labels=labels)).item() == pytest.approx(1 - 2 * p.sum() / (p.sum() + 3), rel=1e-6)


def test_all_ignored_focal_dice_is_zero_not_nan():
    logits, target = torch.randn(1, 3, 2, 2, requires_grad=True), torch.full((1, 2, 2), IGNORE)
    value = build_loss(loss_params(name="focal_dice"), torch.tensor(WEIGHTS), IGNORE)(logits, target)
    value.backward()
    assert value.item() == 0.0 and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("weighted", [False, True])
def test_pixel_weight_is_the_summed_weight_of_the_labelled_pixels(weighted):
    target = torch.tensor([[[0, 2, IGNORE], [2, 2, 1]]])
    weights = torch.tensor([0.5, 2.0, 3.0])
    expected = 0.5 + 3.0 * 3 + 2.0 if weighted else 5.0
    got = pixel_weight(target, weights if weighted else None, IGNORE)
    assert got.dtype == torch.float64 and got.item() == pytest.approx(expected)


def test_pixel_weight_names_class_ids_it_has_no_weight_for():
    with pytest.raises(PipelineError, match=r"outside 0..2"):
        pixel_weight(torch.tensor([[0, 3, IGNORE]]), torch.ones(3), IGNORE)


def test_bf16_logits_are_computed_in_fp32():
    logits, target = tensors()
    for name in ("cross_entropy", "focal_dice"):
        loss = build_loss(loss_params(name=name), torch.tensor(WEIGHTS), IGNORE)
        value = loss(logits.bfloat16(), target)
        assert value.dtype == torch.float32
        assert value.item() == pytest.approx(loss(logits.bfloat16().float(), target).item(), rel=1e-6)


def test_weighted_loss_needs_weights():
    with pytest.raises(PipelineError, match="class_weighted is true but no class weights"):
        build_loss(loss_params(class_weighted=True), None, IGNORE)
    assert build_loss(loss_params(class_weighted=False), None, IGNORE).weight is None


def write_weights(path, classes, weights):
    path.write_text(json.dumps({"method": "inverse_frequency", "max_weight": 5.0, "classes": classes,
                                "counts": {c: 1 for c in classes}, "shares": {c: 1 / len(classes) for c in classes},
                                "weights": weights}))


def test_load_class_weights(tmp_path):
    names = ["Sky", "Logs", "Rocks"]
    write_weights(tmp_path / "cw.json", names, {"Logs": 5.0, "Sky": 0.0104, "Rocks": 0.3278})
    w = load_class_weights(names, tmp_path / "cw.json")
    assert w.dtype == torch.float32 and w.tolist() == pytest.approx([0.0104, 5.0, 0.3278])


def test_class_weights_errors(tmp_path):
    names = ["Sky", "Logs"]
    with pytest.raises(PipelineError, match="cw.json: not found"):
        load_class_weights(names, tmp_path / "cw.json")
    write_weights(tmp_path / "cw.json", ["Logs", "Sky"], {"Logs": 5.0, "Sky": 0.01})
    with pytest.raises(PipelineError, match=r"classes \['Logs', 'Sky'\] differ from params.yaml \['Sky', 'Logs'\]"):
        load_class_weights(names, tmp_path / "cw.json")
    write_weights(tmp_path / "cw.json", names, {"Logs": float("nan"), "Sky": "1"})
    with pytest.raises(PipelineError, match=r"finite non-negative number for \['Sky', 'Logs'\]"):
        load_class_weights(names, tmp_path / "cw.json")
    (tmp_path / "cw.json").write_text("{not json")
    with pytest.raises(PipelineError, match="cw.json: not valid JSON"):
        load_class_weights(names, tmp_path / "cw.json")
