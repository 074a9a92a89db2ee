import json
import math

import numpy as np
import pytest
import torch

from offroad.metrics import (class_mean, class_scores, confusion_matrix, epoch_scores, format_summary, history_table,
                             image_confusion_matrices, rounded, sort_by_iou, summarize)

IGNORE = 255


def brute_force(pred: np.ndarray, target: np.ndarray, k: int) -> tuple[np.ndarray, dict]:
    """Pixel-by-pixel counts and per-class scores written out longhand (None = class absent)."""
    cm = np.zeros((k, k), dtype=np.int64)
    for p, t in zip(pred.ravel().tolist(), target.ravel().tolist()):
        if t != IGNORE:
            cm[t, p] += 1
    scores = {}
    for c in range(k):
        tp = fp = fn = 0
        for p, t in zip(pred.ravel().tolist(), target.ravel().tolist()):
            if t == IGNORE:
                continue
            tp += p == c and t == c
            fp += p == c and t != c
            fn += p != c and t == c
        if tp + fn == 0:
            scores[c] = None
        else:
            scores[c] = {"iou": tp / (tp + fp + fn), "dice": 2 * tp / (2 * tp + fp + fn),
                         "precision": tp / (tp + fp) if tp + fp else 0.0, "recall": tp / (tp + fn)}
    return cm, scores


def test_confusion_matrix_and_summary_match_brute_force():
    rng = np.random.default_rng(0)
    k = 6
    target = rng.integers(0, 4, size=(3, 11, 7))         # classes 4 and 5 never in the ground truth
    target[rng.random(target.shape) < 0.2] = IGNORE
    pred = rng.integers(0, 5, size=target.shape)           # class 4 predicted although absent
    cm_ref, scores = brute_force(pred, target, k)

    cm = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(target), k, IGNORE)
    assert cm.dtype == torch.int64 and cm.device == torch.device("cpu")
    np.testing.assert_array_equal(cm.numpy(), cm_ref)

    names = [f"c{i}" for i in range(k)]
    s = summarize(cm, names)
    present = [c for c in range(k) if scores[c] is not None]
    assert present == [0, 1, 2, 3]
    for c in range(k):
        got = s["per_class"][names[c]]
        if scores[c] is None:
            assert {got[m] for m in ("iou", "dice", "precision", "recall")} == {None}
            assert got["pixel_share"] == 0.0
        else:
            for m, v in scores[c].items():
                assert got[m] == pytest.approx(v, abs=1e-12), (c, m)
    valid = target != IGNORE
    assert s["pixel_accuracy"] == pytest.approx((pred == target)[valid].mean())
    assert s["miou"] == pytest.approx(np.mean([scores[c]["iou"] for c in present]))
    assert s["mdice"] == pytest.approx(np.mean([scores[c]["dice"] for c in present]))
    assert s["mean_class_accuracy"] == pytest.approx(np.mean([scores[c]["recall"] for c in present]))
    shares = [s["per_class"][n]["pixel_share"] for n in names]
    assert shares == pytest.approx([(target[valid] == c).mean() for c in range(k)])
    assert epoch_scores(cm) == pytest.approx((s["miou"], s["mdice"], s["pixel_accuracy"]))


def test_accumulating_batches_equals_one_matrix():
    rng = np.random.default_rng(1)
    pred = torch.from_numpy(rng.integers(0, 4, size=(5, 9, 8)))
    target = torch.from_numpy(rng.integers(0, 4, size=(5, 9, 8)))
    target[0, :3] = IGNORE
    total = sum(confusion_matrix(pred[i:i + 2], target[i:i + 2], 4, IGNORE) for i in range(0, 5, 2))
    expected = [[int(((target == t) & (pred == p)).sum()) for p in range(4)] for t in range(4)]  # brute force
    assert total.tolist() == expected and total.sum() == 5 * 9 * 8 - 3 * 8


def reference_batch_miou(batches: list[tuple[torch.Tensor, torch.Tensor]], k: int) -> float:
    """The reference script: per-batch nanmean of per-class IoU, then the mean over batches."""
    per_batch = []
    for pred, target in batches:
        ious = []
        for c in range(k):
            inter = ((pred == c) & (target == c)).sum().item()
            union = ((pred == c) | (target == c)).sum().item()
            ious.append(inter / union if union else float("nan"))
        per_batch.append(np.nanmean(ious))
    return float(np.mean(per_batch))


def test_dataset_level_miou_differs_from_reference_per_batch_average():
    # Batch A: 8 Background pixels, all right. Batch B: 2 Background + 2 Trees, everything predicted Background.
    a = (torch.zeros(1, 2, 4, dtype=torch.long), torch.zeros(1, 2, 4, dtype=torch.long))
    b = (torch.zeros(1, 2, 2, dtype=torch.long), torch.tensor([[[0, 1], [0, 1]]]))
    assert reference_batch_miou([a, b], 2) == pytest.approx((1.0 + (0.5 + 0.0) / 2) / 2)  # 0.625

    cm = confusion_matrix(*a, 2, IGNORE) + confusion_matrix(*b, 2, IGNORE)
    assert cm.tolist() == [[10, 0], [2, 0]]
    miou = summarize(cm, ["Background", "Trees"])["miou"]
    assert miou == pytest.approx((10 / 12 + 0 / 2) / 2)  # IoU over the whole split: 0.4167
    assert epoch_scores(cm)[0] == pytest.approx(miou)
    assert abs(miou - reference_batch_miou([a, b], 2)) > 0.2


def test_ignore_index_pixels_never_count():
    target = torch.tensor([[0, 1, IGNORE, IGNORE]])
    cm_a = confusion_matrix(torch.tensor([[0, 1, 0, 0]]), target, 2, IGNORE)
    cm_b = confusion_matrix(torch.tensor([[0, 1, 1, 1]]), target, 2, IGNORE)
    assert cm_a.tolist() == cm_b.tolist() == [[1, 0], [0, 1]]


@pytest.mark.parametrize("pred,target", [([[0, 2]], [[0, 1]]), ([[2, 1]], [[0, 1]]), ([[0, 1]], [[0, 2]]),
                                         ([[0, -1]], [[0, 1]]), ([[0, 1]], [[0, -1]]), ([[0, 1]], [[0, 3]])])
def test_out_of_range_ids_are_rejected(pred, target):
    with pytest.raises(ValueError, match="outside 0..1"):
        confusion_matrix(torch.tensor(pred), torch.tensor(target), 2, IGNORE)


def test_image_confusion_matrices_are_each_images_own_counts():
    rng = np.random.default_rng(3)
    target = rng.integers(0, 4, (3, 6, 5))
    target[1, :2] = IGNORE
    pred = rng.integers(0, 4, (3, 6, 5))
    cms = image_confusion_matrices(torch.from_numpy(pred), torch.from_numpy(target), 4, IGNORE)
    assert cms.shape == (3, 4, 4)
    for i in range(3):
        np.testing.assert_array_equal(cms[i].numpy(), brute_force(pred[i], target[i], 4)[0])


@pytest.mark.parametrize("bad", [(0, "target", 2), (0, "pred", 2), (1, "target", -1), (0, "target", 3)])
def test_an_out_of_range_id_in_one_image_does_not_land_in_another(bad):
    image, which, value = bad
    ids = {"pred": torch.zeros(2, 4, dtype=torch.long), "target": torch.ones(2, 4, dtype=torch.long)}
    ids[which][image, 1] = value
    with pytest.raises(ValueError, match="outside 0..1"):
        image_confusion_matrices(ids["pred"], ids["target"], 2, IGNORE)


def test_summarize_nulls_and_json():
    # Trees never in the ground truth but predicted; Rocks present but never predicted.
    cm = torch.tensor([[5, 1, 0], [0, 0, 0], [2, 0, 0]])
    s = summarize(cm, ["Background", "Trees", "Rocks"])
    assert s["per_class"]["Trees"] == {"iou": None, "dice": None, "precision": None, "recall": None, "pixel_share": 0.0}
    assert s["per_class"]["Rocks"] == {"iou": 0.0, "dice": 0.0, "precision": 0.0, "recall": 0.0, "pixel_share": 0.25}
    assert s["miou"] == pytest.approx((5 / 8 + 0.0) / 2)  # Trees left out of the mean, not counted as 0 or 1
    assert s["mdice"] == pytest.approx((10 / 13 + 0.0) / 2)
    assert s["mean_class_accuracy"] == pytest.approx((5 / 6 + 0.0) / 2)
    json.dumps(s, allow_nan=False)

    empty = summarize(torch.zeros(2, 2, dtype=torch.int64), ["a", "b"])
    assert empty["miou"] is empty["mdice"] is empty["pixel_accuracy"] is empty["mean_class_accuracy"] is None
    assert all(math.isnan(v) for v in epoch_scores(torch.zeros(2, 2, dtype=torch.int64)))
    with pytest.raises(ValueError, match="2 class names"):
        summarize(cm, ["a", "b"])


def test_rounded_and_table():
    s = summarize(torch.tensor([[3, 1, 0], [1, 5, 0], [0, 0, 0]]), ["Sky", "Logs", "Trees"])
    r = rounded(s, 3)
    assert r["miou"] == round(s["miou"], 3) and r["per_class"]["Trees"]["iou"] is None
    lines = format_summary(s).splitlines()
    rows = [line.split()[0] for line in lines[lines.index("") + 2:]]
    assert rows == ["Logs", "Sky", "Trees"]  # best IoU first (5/7 > 3/5), absent class last
    assert "—" in lines[-1]


def test_sort_by_iou_puts_the_best_first_and_absent_classes_last_in_class_order():
    per_class = {"A": {"iou": 0.2}, "B": {"iou": None}, "C": {"iou": 0.9}, "D": {"iou": 0.0}, "E": {"iou": None}}
    assert [name for name, _ in sort_by_iou(per_class)] == ["C", "A", "D", "B", "E"]


def test_rounded_reaches_into_lists_and_tuples():
    assert rounded({"a": [0.123456789, (1.0004, "x")], "b": 2}, 3) == {"a": [0.123, [1.0, "x"]], "b": 2}
    assert rounded(1 / 3) == 0.33333  # five digits by default


def test_format_summary_prints_each_score_with_its_unit():
    s = summarize(torch.tensor([[3, 1, 0], [1, 5, 0], [0, 0, 0]]), ["Sky", "Log", "Tree"])  # names below 5 letters
    lines = format_summary(s).splitlines()
    assert lines[0].split() == ["Mean", "IoU", f"{s['miou']:.4f}"]
    assert lines[1].split() == ["Mean", "Dice", f"{s['mdice']:.4f}"]
    assert lines[2].split() == ["Pixel", "accuracy", f"{100 * s['pixel_accuracy']:.2f}%"]
    assert lines[3].split() == ["Mean", "class", "accuracy", f"{100 * s['mean_class_accuracy']:.2f}%"]
    assert lines[5].split() == ["Class", "IoU", "Dice", "Precision", "Recall", "%", "pixels"]
    logs = s["per_class"]["Log"]  # 5 right of 6 labelled and of 6 predicted; 6 of 10 pixels
    assert lines[6].split() == ["Log", f"{5 / 7:.4f}", f"{10 / 12:.4f}", f"{5 / 6:.4f}", f"{5 / 6:.4f}", "60.00%"]
    assert logs["iou"] == pytest.approx(5 / 7)
    assert lines[8].split() == ["Tree", "—", "—", "—", "—", "0.00%"]
    assert len({len(line) for line in lines[5:]}) == 1  # the columns line up


def test_history_table_marks_the_best_val_epoch_and_formats_each_column():
    history = {"epoch": np.array([1, 2, 3]), "train_loss": np.array([1.5, 1.25, 1.0]),
               "val_loss": np.array([1.4, 1.3, 1.35]), "train_iou": np.array([0.1, 0.2, 0.3]),
               "val_iou": np.array([0.15, 0.25, 0.2]), "train_dice": np.array([0.2, 0.3, 0.4]),
               "val_dice": np.array([0.25, 0.35, 0.3]), "train_acc": np.array([0.5, 0.6, 0.7]),
               "val_acc": np.array([0.55, 0.65, 0.6]), "lr": np.array([1e-3, 5e-4, 0.0])}
    lines = history_table(history).splitlines()
    assert lines[0].split() == ["Epoch", "Train", "Loss", "Val", "Loss", "Train", "IoU", "Val", "IoU", "Train", "Dice",
                                "Val", "Dice", "Train", "Acc", "Val", "Acc", "LR"]
    assert lines[2].split() == ["2*", "1.2500", "1.3000", "0.2000", "0.2500", "0.3000", "0.3500", "60.00%", "65.00%",
                                "5.00e-04"]
    assert [line.split()[0] for line in lines[1:]] == ["1", "2*", "3"]
    assert len({len(line) for line in lines}) == 1


def test_class_scores_of_a_stack_are_each_matrix_s_scores():
    stack = np.array([[[3, 1], [0, 2]], [[0, 0], [4, 1]], [[5, 0], [0, 0]]])  # 3 matrices of 2 classes (bootstrap)
    scores = class_scores(stack)
    for i, cm in enumerate(stack):
        one = class_scores(torch.tensor(cm))
        for name in ("iou", "dice", "precision", "recall", "pixel_share", "pixel_accuracy"):
            np.testing.assert_array_equal(scores[name][i], one[name])
    np.testing.assert_array_equal(scores["iou"][0], [3 / 4, 2 / 3])


def test_class_scores_at_one_pixel_and_for_an_empty_matrix():
    s = class_scores(np.array([[1, 0, 0], [0, 0, 1], [0, 0, 0]]))  # class 0 right once, class 1 taken for 2 once
    np.testing.assert_array_equal(s["iou"], [1.0, 0.0, np.nan])
    np.testing.assert_array_equal(s["precision"], [1.0, 0.0, np.nan])
    np.testing.assert_array_equal(s["pixel_share"], [0.5, 0.5, 0.0])
    assert s["pixel_accuracy"] == 0.5
    one = class_scores(np.array([[1, 0], [0, 0]]))
    assert one["pixel_accuracy"] == 1.0 and one["pixel_share"].tolist() == [1.0, 0.0]
    empty = class_scores(np.zeros((2, 2), np.int64))
    assert empty["pixel_share"].tolist() == [0.0, 0.0] and np.isnan(empty["pixel_accuracy"])


def test_class_mean_averages_each_row_s_present_classes():
    np.testing.assert_array_equal(class_mean(np.array([[0.2, np.nan], [0.4, 0.6], [np.nan, np.nan]])),
                                  [0.2, 0.5, np.nan])
