"""Dataset-level segmentation metrics from one confusion matrix (DESIGN.md §5).

Rows of the matrix are ground truth, columns predictions. A class absent from the ground truth
has no IoU/Dice/precision/recall (None) and is left out of every mean.
"""
from __future__ import annotations

import math

import numpy as np
import torch

SCORES = ("iou", "dice", "precision", "recall")


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """int64 [K, K] counts over all pixels whose target is not ignore_index, on the tensors' device."""
    return image_confusion_matrices(pred.reshape(1, -1), target.reshape(1, -1), num_classes, ignore_index)[0]


def image_confusion_matrices(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                             ignore_index: int) -> torch.Tensor:
    """int64 [B, K, K]: one confusion matrix per image of a [B, ...] batch, from one bincount.

    Elementwise only (boolean-mask indexing costs a nonzero and a gather per call): ignored targets count in
    an extra row K that is dropped.
    """
    k, b = num_classes, target.shape[0]
    ignored = target == ignore_index
    t, p = torch.where(ignored, k, target.long()), pred.long()
    t_lo, t_hi, p_lo, p_hi = torch.stack([*torch.aminmax(t), *torch.aminmax(p)]).tolist()
    if t_lo >= 0 and t_hi <= k and p_lo >= 0 and p_hi < k:
        image = torch.arange(b, device=target.device).view(b, *([1] * (target.dim() - 1)))
        cells = ((image * (k + 1) + t) * k + p).flatten()
        cms = torch.bincount(cells, minlength=b * (k + 1) * k).view(b, k + 1, k)
        if cms[:, k].sum() == ignored.sum():  # row K holds the ignored pixels and no target id K
            return cms[:, :k]
    raise ValueError(f"confusion_matrix: class ids outside 0..{k - 1} (and not ignore_index {ignore_index})")


def _per_class(cm) -> dict[str, np.ndarray]:
    """Per-class scores as float arrays, NaN where the class is absent from the ground truth."""
    cm = cm.cpu().numpy() if isinstance(cm, torch.Tensor) else np.asarray(cm)
    cm = cm.astype(np.float64)
    tp = np.diag(cm)
    gt = cm.sum(1)
    pr = cm.sum(0)
    present = gt > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        scores = {
            "iou": tp / (gt + pr - tp),
            "dice": 2 * tp / (gt + pr),
            "precision": np.where(pr > 0, tp / pr, 0.0),  # present but never predicted: 0
            "recall": tp / gt,
        }
    scores = {name: np.where(present, s, np.nan) for name, s in scores.items()}
    total = cm.sum()
    scores["pixel_share"] = gt / total if total else np.zeros_like(gt)
    scores["pixel_accuracy"] = np.array(tp.sum() / total if total else np.nan)
    return scores


def _mean(values: np.ndarray) -> float:
    return float(np.nanmean(values)) if not np.isnan(values).all() else math.nan


def _or_none(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def epoch_scores(cm) -> tuple[float, float, float]:
    """(mIoU, mDice, pixel accuracy) as floats; NaN when the matrix is empty."""
    s = _per_class(cm)
    return _mean(s["iou"]), _mean(s["dice"]), float(s["pixel_accuracy"])


def summarize(cm, class_names: list[str]) -> dict:
    s = _per_class(cm)
    if len(class_names) != len(s["iou"]):
        raise ValueError(f"summarize: {len(class_names)} class names for a {len(s['iou'])}-class matrix")
    per_class = {
        name: {**{k: _or_none(s[k][i]) for k in SCORES}, "pixel_share": float(s["pixel_share"][i])}
        for i, name in enumerate(class_names)
    }
    return {
        "miou": _or_none(_mean(s["iou"])),
        "mdice": _or_none(_mean(s["dice"])),
        "pixel_accuracy": _or_none(float(s["pixel_accuracy"])),
        "mean_class_accuracy": _or_none(_mean(s["recall"])),
        "per_class": per_class,
    }


def rounded(obj, digits: int = 5):
    """Round every float in a nested dict/list, so `dvc metrics diff` stays readable."""
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [rounded(v, digits) for v in obj]
    return obj


def _fmt(x: float | None, pct: bool = False) -> str:
    if x is None:
        return "—"
    return f"{100 * x:.2f}%" if pct else f"{x:.4f}"


def format_summary(summary: dict) -> str:
    """The overall scores and a per-class table sorted by IoU (absent classes last), as text."""
    lines = [
        f"Mean IoU             {_fmt(summary['miou'])}",
        f"Mean Dice            {_fmt(summary['mdice'])}",
        f"Pixel accuracy       {_fmt(summary['pixel_accuracy'], pct=True)}",
        f"Mean class accuracy  {_fmt(summary['mean_class_accuracy'], pct=True)}",
        "",
    ]
    width = max(len("Class"), *(len(n) for n in summary["per_class"]))
    lines.append(f"{'Class':<{width}}  {'IoU':>7}  {'Dice':>7}  {'Precision':>9}  {'Recall':>7}  {'% pixels':>8}")
    for name, c in sort_by_iou(summary["per_class"]):
        lines.append(f"{name:<{width}}  {_fmt(c['iou']):>7}  {_fmt(c['dice']):>7}  {_fmt(c['precision']):>9}  "
                     f"{_fmt(c['recall']):>7}  {_fmt(c['pixel_share'], pct=True):>8}")
    return "\n".join(lines) + "\n"


def sort_by_iou(per_class: dict) -> list[tuple[str, dict]]:
    """Per-class items by IoU, best first; classes without an IoU last, in class order."""
    items = list(per_class.items())
    return sorted(items, key=lambda kv: (kv[1]["iou"] is None, -(kv[1]["iou"] or 0.0)))


def history_table(history: dict[str, np.ndarray]) -> str:
    """The per-epoch training table of the report, best val mIoU marked with *."""
    best = int(np.argmax(history["val_iou"]))
    lines = [f"{'Epoch':>6}  {'Train Loss':>10}  {'Val Loss':>8}  {'Train IoU':>9}  {'Val IoU':>7}  "
             f"{'Train Dice':>10}  {'Val Dice':>8}  {'Train Acc':>9}  {'Val Acc':>7}  {'LR':>8}"]
    for i in range(len(history["epoch"])):
        v = {k: a[i] for k, a in history.items()}
        mark = "*" if i == best else " "
        lines.append(f"{int(v['epoch']):>5}{mark}  {v['train_loss']:>10.4f}  {v['val_loss']:>8.4f}  "
                     f"{v['train_iou']:>9.4f}  {v['val_iou']:>7.4f}  {v['train_dice']:>10.4f}  {v['val_dice']:>8.4f}  "
                     f"{100 * v['train_acc']:>8.2f}%  {100 * v['val_acc']:>6.2f}%  {v['lr']:>8.2e}")
    return "\n".join(lines) + "\n"
