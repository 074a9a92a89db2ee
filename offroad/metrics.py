"""Dataset-level segmentation metrics: every score comes from one confusion matrix summed over all images, never
from a mean of per-batch scores as the reference script takes them (a batch's few pixels of a class then weigh
as much as the whole split's; tests/test_metrics.py shows the difference).

Rows of the matrix are ground truth, columns predictions. A class absent from the ground truth
has no IoU/Dice/precision/recall (None) and is left out of every mean.
"""
from __future__ import annotations

import math

import numpy as np
import torch

SCORES = ("miou", "mdice", "pixel_accuracy", "mean_class_accuracy")  # dataset-level, all higher-is-better
CLASS_SCORES = ("iou", "dice", "precision", "recall")


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


def class_scores(cms) -> dict[str, np.ndarray]:
    """Per-class scores of a confusion matrix [K, K] or a stack of them [..., K, K], as float64 arrays [..., K]:
    NaN where the class is absent from the ground truth; also "pixel_share" [..., K] and "pixel_accuracy" [...]
    (NaN for an empty matrix)."""
    cms = cms.cpu().numpy() if isinstance(cms, torch.Tensor) else np.asarray(cms)
    cms = cms.astype(np.float64)
    tp = np.diagonal(cms, axis1=-2, axis2=-1)
    gt, pr = cms.sum(-1), cms.sum(-2)
    total = gt.sum(-1)
    present = gt > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        scores = {
            "iou": tp / (gt + pr - tp),
            "dice": 2 * tp / (gt + pr),
            "precision": np.where(pr > 0, tp / pr, 0.0),  # present but never predicted: 0
            "recall": tp / gt,
        }
        scores = {name: np.where(present, s, np.nan) for name, s in scores.items()}
        scores["pixel_share"] = np.where(total[..., None] > 0, gt / total[..., None], 0.0)
        scores["pixel_accuracy"] = np.where(total > 0, tp.sum(-1) / total, np.nan)
    return scores


def class_mean(values: np.ndarray) -> np.ndarray:
    """The mean over the last axis (the classes) of the values that are not NaN; NaN where all are."""
    counted = (~np.isnan(values)).sum(-1)
    with np.errstate(invalid="ignore"):
        return np.where(counted > 0, np.nansum(values, -1) / counted, np.nan)


def dataset_scores(cms) -> dict[str, np.ndarray]:
    """Each of SCORES for a confusion matrix [K, K] or a stack of them [..., K, K]; NaN where undefined."""
    s = class_scores(cms)
    return {"miou": class_mean(s["iou"]), "mdice": class_mean(s["dice"]), "pixel_accuracy": s["pixel_accuracy"],
            "mean_class_accuracy": class_mean(s["recall"])}


def _or_none(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def epoch_scores(cm) -> tuple[float, float, float]:
    """(mIoU, mDice, pixel accuracy) as floats; NaN when the matrix is empty."""
    s = dataset_scores(cm)
    return float(s["miou"]), float(s["mdice"]), float(s["pixel_accuracy"])


def summarize(cm, class_names: list[str]) -> dict:
    """SCORES and the per-class scores of one confusion matrix [K, K], None where undefined."""
    s = class_scores(cm)
    if len(class_names) != len(s["iou"]):
        raise ValueError(f"summarize: {len(class_names)} class names for a {len(s['iou'])}-class matrix")
    per_class = {
        name: {**{k: _or_none(s[k][i]) for k in CLASS_SCORES}, "pixel_share": float(s["pixel_share"][i])}
        for i, name in enumerate(class_names)
    }
    return {**{name: _or_none(float(v)) for name, v in dataset_scores(cm).items()}, "per_class": per_class}


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
