"""Stage `evaluate`: the kept checkpoint on the evaluation split, scored from one confusion matrix."""
from __future__ import annotations

import csv
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from stages import artifacts
from stages.dataset import PreparedSplit, load_split
from stages.errors import run_cli
from stages.losses import build_loss, load_class_weights
from stages.metrics import confusion_matrix, format_summary, read_history, rounded, sort_by_iou, summarize
from stages.model import Segmenter, load_segmenter
from stages.params import load_params
from stages.runtime import autocast, configure_cpu, resolve_device

CHECKPOINTS = {"best": Path("models/best.pt"), "final": Path("models/final.pt")}
PREPARED = Path("data/prepared")
CLASS_WEIGHTS = Path("data/class_weights.json")
HISTORY = Path("plots/train/history.csv")
METRICS = Path("metrics/evaluate.json")
TABLE = Path("metrics/evaluation_metrics.txt")
PER_CLASS = Path("plots/evaluate/per_class.csv")
CONFUSION = Path("plots/evaluate/confusion.csv")
EXAMPLES = Path("plots/evaluate/examples.npz")
DIGITS = 5


@dataclass
class Evaluation:
    cm: torch.Tensor    # int64 [K, K] on the CPU, rows = ground truth
    loss: float         # mean loss per image
    preds: np.ndarray   # uint8 [E, H, W], predictions for the first E images


def evaluate(segmenter: Segmenter, split: PreparedSplit, loss_fn: nn.Module, device: torch.device, amp: bool,
             batch_size: int, num_classes: int, ignore_index: int, examples: int = 0) -> Evaluation:
    n = len(split)
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), device=device)
    preds = []
    segmenter.eval()
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            images = torch.from_numpy(np.array(split.images[start:start + batch_size])).to(device)
            masks = torch.from_numpy(np.array(split.masks[start:start + batch_size])).to(device).long()
            with autocast(device, amp):
                logits = segmenter(images)
            logits = logits.float()
            loss_sum += loss_fn(logits, masks) * len(images)
            pred = logits.argmax(1)
            cm += confusion_matrix(pred, masks, num_classes, ignore_index)
            if start < examples:
                preds.append(pred[:examples - start].to(torch.uint8).cpu())
    h, w = split.masks.shape[1:]
    preds_np = torch.cat(preds).numpy() if preds else np.zeros((0, h, w), np.uint8)
    return Evaluation(cm.cpu(), float(loss_sum) / max(n, 1), preds_np)


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez with fixed zip timestamps, so equal arrays give equal bytes."""
    with artifacts.atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w") as zf:
        for name, array in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(array), allow_pickle=False)
            zf.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), buf.getvalue())


def _csv(rows: list[list]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def per_class_csv(summary: dict) -> str:
    """Classes present in the split, best IoU first (absent classes have no scores to plot)."""
    cols = ["iou", "dice", "precision", "recall", "pixel_share"]
    rows = [[name, *(round(c[k], DIGITS) for k in cols)] for name, c in sort_by_iou(summary["per_class"])
            if c["iou"] is not None]
    return _csv([["class", *cols], *rows])


def confusion_csv(cm: torch.Tensor, names: list[str]) -> str:
    return _csv([["truth/prediction", *names], *([n, *row] for n, row in zip(names, cm.tolist()))])


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


def main() -> None:
    configure_cpu()
    params = load_params()
    data, names = params.data, params.data.class_names
    device = resolve_device(params.train.device)
    checkpoint = CHECKPOINTS[params.train.checkpoint]
    segmenter, ckpt = load_segmenter(checkpoint, params.model, names, device)
    split = load_split(PREPARED, params.evaluate.split)
    history = read_history(HISTORY)
    weights = load_class_weights(CLASS_WEIGHTS, names).to(device) if params.loss.class_weighted else None
    loss_fn = build_loss(params.loss, weights, data.ignore_index)
    examples = min(params.evaluate.examples, len(split))
    result = evaluate(segmenter, split, loss_fn, device, params.train.amp, params.evaluate.batch_size,
                      data.num_classes, data.ignore_index, examples)

    summary = summarize(result.cm, names)
    report = {
        "miou": summary["miou"], "mdice": summary["mdice"], "pixel_accuracy": summary["pixel_accuracy"],
        "mean_class_accuracy": summary["mean_class_accuracy"], "loss": result.loss,
        "checkpoint": str(checkpoint), "epoch": ckpt["epoch"], "split": params.evaluate.split, "images": len(split),
        "per_class": summary["per_class"],
    }
    weighting = "class-weighted " if params.loss.class_weighted else ""
    header = (f"Evaluation of {checkpoint} (epoch {ckpt['epoch']}) on the {params.evaluate.split} split "
              f"({len(split)} images, dataset-level scores from one confusion matrix)\n\n"
              f"Loss ({weighting}{params.loss.name})  {result.loss:.4f}\n")
    table = format_summary(summary)
    artifacts.write_json(METRICS, rounded(report, DIGITS))
    epochs = f"\nTraining history ({HISTORY}, * = best val mIoU)\n{history_table(history)}"
    artifacts.write_text(TABLE, header + table + epochs)
    artifacts.write_text(PER_CLASS, per_class_csv(summary))
    artifacts.write_text(CONFUSION, confusion_csv(result.cm, names))
    save_npz(EXAMPLES, {"images": split.images[:examples], "masks": split.masks[:examples], "preds": result.preds,
                        "names": np.array(split.names[:examples], dtype=str)})
    print(header + table, end="")


if __name__ == "__main__":
    run_cli(main)
