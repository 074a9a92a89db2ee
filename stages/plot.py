"""Stage `plot`: the PNGs a reviewer looks at, drawn from the train and evaluate outputs."""
from __future__ import annotations

import csv
import json
import zipfile
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from stages.artifacts import atomic_path
from stages.errors import PipelineError, run_cli
from stages.metrics import read_history
from stages.params import load_params
from stages.visualize import ERROR_COLOR, IGNORE_COLOR, colorize, error_map, palette

HISTORY = Path("plots/train/history.csv")
PER_CLASS = Path("plots/evaluate/per_class.csv")
CONFUSION = Path("plots/evaluate/confusion.csv")
EXAMPLES = Path("plots/evaluate/examples.npz")
CLASS_STATS = Path("metrics/class_stats.json")
OUT = Path("plots/images")
PER_CLASS_COLUMNS = ("class", "iou", "dice", "precision", "recall", "pixel_share")


class PlotInputError(PipelineError):
    pass


def _read_csv(path: Path, columns: tuple[str, ...]) -> list[dict[str, str]]:
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = reader.fieldnames or []
    except FileNotFoundError:
        raise PlotInputError(f"{path}: not found (run the stage that writes it first)") from None
    missing = [c for c in columns if c not in header]
    if missing or not rows:
        raise PlotInputError(f"{path}: " + (f"missing columns {missing}" if missing else "no rows"))
    return rows


def read_per_class(path: Path = PER_CLASS) -> list[dict]:
    rows = _read_csv(path, PER_CLASS_COLUMNS)
    try:
        return [{"class": r["class"], **{c: float(r[c]) for c in PER_CLASS_COLUMNS[1:]}} for r in rows]
    except ValueError as e:
        raise PlotInputError(f"{path}: {e}") from None


def read_confusion(path: Path = CONFUSION) -> tuple[np.ndarray, list[str]]:
    """Count matrix (rows = truth) and the class names from the header."""
    try:
        with open(path, newline="") as f:
            header, *rows = list(csv.reader(f))
    except (FileNotFoundError, ValueError):
        raise PlotInputError(f"{path}: not found or empty") from None
    names = header[1:]
    if [r[0] for r in rows] != names or any(len(r) != len(header) for r in rows):
        raise PlotInputError(f"{path}: expected a {len(names)}x{len(names)} matrix with the header's classes as rows")
    return np.array([[int(v) for v in r[1:]] for r in rows], dtype=np.int64), names


def read_examples(path: Path = EXAMPLES) -> dict[str, np.ndarray]:
    try:
        with np.load(path) as z:
            return {k: z[k] for k in ("images", "masks", "preds", "names")}
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:  # missing, not an npz, corrupt, pickled
        reason = str(e).split(". ")[0]  # numpy's pickle message goes on to suggest loading it unsafely
        raise PlotInputError(f"{path}: not a readable examples archive ({reason}); run `dvc repro evaluate`") from None


def read_class_stats(path: Path = CLASS_STATS) -> dict[str, dict]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PlotInputError(f"{path}: not found (run the class_weights stage first)") from None
    except ValueError as e:
        raise PlotInputError(f"{path}: not valid JSON ({e})") from None


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
    panels = [("loss", "Loss", "loss (mean per image)", 1), ("iou", "Mean IoU", "mIoU", 1),
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


def confusion_matrix(cm: np.ndarray, names: list[str]) -> Figure:
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


def main() -> None:
    params = load_params()
    names, dpi = params.data.class_names, params.plot.dpi
    colors = dict(zip(names, palette(len(names))))
    history, per_class, stats = read_history(HISTORY), read_per_class(), read_class_stats()
    cm, cm_names = read_confusion()
    if cm_names != names:
        raise PlotInputError(f"{CONFUSION}: classes {cm_names} differ from params data.classes {names}")
    for path, found in [(PER_CLASS, [r["class"] for r in per_class]), (CLASS_STATS, list(stats))]:
        unknown = sorted(set(found) - set(names))
        if unknown:
            raise PlotInputError(f"{path}: classes {unknown} are not in params data.classes {names}")
    figures = {
        "all_metrics_curves.png": metrics_curves(history),
        "per_class_iou.png": per_class_iou(per_class, colors),
        "lr_schedule.png": lr_schedule(history),
        "confusion_matrix.png": confusion_matrix(cm, names),
        "class_distribution.png": class_distribution(stats, colors),
        "predictions.png": predictions(read_examples(), names),
    }
    for filename, fig in figures.items():
        save(fig, OUT / filename, dpi)
    print(f"plot: wrote {len(figures)} PNGs to {OUT}/")


if __name__ == "__main__":
    run_cli(main)
