"""The figures a reviewer looks at, drawn with matplotlib from the train and evaluate outputs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from offroad.atomic import atomic_path
from offroad.visualize import ERROR_COLOR, IGNORE_COLOR, colorize, error_map, palette


def save(fig: Figure, path: Path, dpi: int) -> None:
    # No Software/date metadata: the same inputs give the same bytes.
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, metadata={"Software": None})


def best_epoch(history: dict[str, np.ndarray]) -> tuple[int, float]:
    i = int(np.nanargmax(history["val_iou"]))
    return int(history["epoch"][i]), float(history["val_iou"][i])


def metrics_curves(history: dict[str, np.ndarray]) -> Figure:
    fig = Figure(figsize=(12, 8), layout="constrained")
    axes = fig.subplots(2, 2).ravel()
    epoch, (best, best_iou) = history["epoch"], best_epoch(history)
    panels = [("loss", "Loss", "loss (weighted mean over pixels)", 1), ("iou", "Mean IoU", "mIoU", 1),
              ("dice", "Mean Dice", "mDice", 1), ("acc", "Pixel accuracy", "accuracy (%)", 100)]
    for ax, (key, title, ylabel, scale) in zip(axes, panels):
        ax.plot(epoch, scale * history[f"train_{key}"], "o-", ms=3, label="train")
        ax.plot(epoch, scale * history[f"val_{key}"], "s-", ms=3, label="val")
        ax.axvline(best, color="red", ls="--", lw=1, label=f"best epoch {best} (val mIoU {best_iou:.4f})")
        ax.set(title=title, xlabel="epoch", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Training curves: train vs validation")
    return fig


def per_class_iou(rows: list[dict], colors: dict[str, np.ndarray]) -> Figure:
    rows = sorted(rows, key=lambda r: -r["iou"])[::-1]  # barh draws bottom-up: best on top, ties in file order
    fig = Figure(figsize=(9, 0.45 * len(rows) + 1.5), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(rows))
    ax.barh(y, [r["iou"] for r in rows], color=[colors[r["class"]] / 255 for r in rows], edgecolor="black", lw=0.5)
    for yi, r in zip(y, rows):
        ax.text(r["iou"] + 0.01, yi, f"{r['iou']:.3f}  ({100 * r['pixel_share']:.2f}% of pixels)", va="center",
                fontsize=8, bbox=dict(facecolor="white", edgecolor="none", pad=1))
    miou = float(np.mean([r["iou"] for r in rows]))
    ax.axvline(miou, color="black", ls="--", lw=1, label=f"mIoU {miou:.4f}")
    ax.set_yticks(y, [r["class"] for r in rows])
    ax.set_xticks(np.linspace(0, 1, 6))
    ax.set(xlim=(0, 1.3), xlabel="IoU (intersection over union)", title="Per-class IoU (evaluation split)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right")
    return fig


def lr_schedule(history: dict[str, np.ndarray]) -> Figure:
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    ax.plot(history["epoch"], history["lr"], "o-", ms=3)
    ax.set(title="Learning rate schedule", xlabel="epoch", ylabel="learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    ax.grid(alpha=0.3)
    return fig


def confusion_heatmap(cm: np.ndarray, names: list[str]) -> Figure:
    k = len(names)
    rows = cm.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        pct = np.where(rows > 0, 100 * cm / rows, np.nan)
    fig = Figure(figsize=(0.8 * k + 3, 0.7 * k + 2), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(pct, cmap="Blues", vmin=0, vmax=100)
    for i in range(k):
        if rows[i, 0] == 0:
            ax.text((k - 1) / 2, i, "class absent from the split", ha="center", va="center", fontsize=8, color="gray")
        for j in range(k):
            if cm[i, j]:
                ax.text(j, i, f"{pct[i, j]:.1f}", ha="center", va="center", fontsize=7,
                        color="white" if pct[i, j] > 60 else "black")
    ax.set_xticks(range(k), names, rotation=45, ha="right")
    ax.set_yticks(range(k), names)
    ax.set(xlabel="predicted class", ylabel="true class",
           title="Confusion matrix (row-normalised: % of each true class's pixels; blank = none)")
    fig.colorbar(im, ax=ax, label="% of true-class pixels")
    return fig


def class_distribution(stats: dict[str, dict], colors: dict[str, np.ndarray]) -> Figure:
    items = sorted(stats.items(), key=lambda kv: kv[1]["share"])
    names = [n for n, _ in items]
    fig = Figure(figsize=(12, 0.45 * len(items) + 1.5), layout="constrained")
    ax_share, ax_weight = fig.subplots(1, 2, sharey=True)
    y = np.arange(len(items))
    bar_colors = [colors[n] / 255 for n in names]
    for ax, key, scale, fmt, title in [
        (ax_share, "share", 100, "{:.2f}%", "Pixel share (train split)"),
        (ax_weight, "weight", 1, "{:.4f}", "Loss weight per class"),
    ]:
        values = np.array([s[key] for _, s in items], dtype=float) * scale
        ax.barh(y, values, color=bar_colors, edgecolor="black", lw=0.5)
        for yi, v in zip(y, values):
            ax.text(v * 1.1, yi, fmt.format(v), va="center", fontsize=8)
        ax.set_xscale("log")
        ax.set_xlim(values[values > 0].min() / 2 if (values > 0).any() else 1e-3, values.max() * 8)
        ax.set(title=title)
        ax.grid(axis="x", alpha=0.3)
    ax_share.set(xlabel="% of labelled training pixels (log scale)")
    ax_weight.set(xlabel="class weight (log scale)")
    ax_share.set_yticks(y, names)
    fig.suptitle("Class distribution and class weights")
    return fig


def predictions(examples: dict[str, np.ndarray], class_names: list[str]) -> Figure:
    images, masks, preds, names = (examples[k] for k in ("images", "masks", "preds", "names"))
    k, n = len(class_names), len(images)
    if n == 0:
        fig = Figure(figsize=(6, 2))
        fig.text(0.5, 0.5, "no example images (evaluate.examples = 0)", ha="center", va="center")
        return fig
    h, w = images.shape[1:3]
    fig = Figure(figsize=(4 * 3.2, n * 3.2 * h / w + 1.4), layout="constrained")
    axes = fig.subplots(n, 4, squeeze=False)
    for i in range(n):
        valid = masks[i] < k
        acc = 100 * float((preds[i] == masks[i])[valid].mean()) if valid.any() else float("nan")
        panels = [(images[i], str(names[i])), (colorize(masks[i], k), "ground truth"),
                  (colorize(preds[i], k), "prediction"),
                  (error_map(images[i], masks[i], preds[i], k), f"errors (pixel accuracy {acc:.1f}%)")]
        for ax, (picture, title) in zip(axes[i], panels):
            ax.imshow(picture, interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.set_axis_off()
    colors = palette(k)
    handles = [Patch(color=colors[c] / 255, label=name) for c, name in enumerate(class_names)]
    handles += [Patch(color=ERROR_COLOR / 255, label="error"), Patch(color=IGNORE_COLOR / 255, label="ignored")]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6), fontsize=9)
    fig.suptitle("Predictions on fixed evaluation images: image | ground truth | prediction | errors")
    return fig
