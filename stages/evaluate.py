"""Stage `evaluate`: the kept checkpoint on the evaluation split, scored from one confusion matrix."""
from __future__ import annotations

import numpy as np

from offroad import artifacts, atomic, bootstrap
from offroad.config import load_params
from offroad.errors import run_cli, warn
from offroad.evaluation import Scoring, evaluate, image_features
from offroad.losses import build_loss
from offroad.metrics import format_summary, history_table, rounded, sort_by_iou, summarize
from offroad.runtime import Run, configure_cpu, resolve_device
from offroad.segmenter import load_segmenter, place


def main() -> None:
    configure_cpu()
    params = load_params()
    data, cfg = params.data, params.evaluate
    run = Run.from_params(params, resolve_device(params.train.device))
    print(f"evaluate: {run.device}, {run.precision}")
    atomic.check_writable(artifacts.EVAL_METRICS, artifacts.EVAL_TABLE, artifacts.PER_CLASS, artifacts.CONFUSION,
                             artifacts.EXAMPLES)
    checkpoint = artifacts.CHECKPOINTS[params.train.checkpoint]
    model, ckpt = load_segmenter(checkpoint, params.model, data.class_names, run.device)
    model = place(model, run)
    split = artifacts.load_split(artifacts.PREPARED, cfg.split, data)
    artifacts.label_counts(split.masks, artifacts.PREPARED / cfg.split, data, "there is nothing to score")
    if cfg.split == "train":
        warn("evaluate.split is 'train': the scores measure how well the model fits its training images, "
             "not how well it generalises")
    history = artifacts.read_history()
    weights = artifacts.read_class_weights(data.class_names).to(run.device) if params.loss.class_weighted else None
    loss_fn = build_loss(params.loss, weights, data.ignore_index)
    keep = min(cfg.examples, len(split))
    images = Scoring(image_features(model, split.images, run), split.masks, np.arange(len(split)), cfg.batch_size,
                     keep)
    result = evaluate(model, loss_fn, images, run)

    summary = summarize(result.cm, data.class_names)
    report = {
        "miou": summary["miou"], "mdice": summary["mdice"], "pixel_accuracy": summary["pixel_accuracy"],
        "mean_class_accuracy": summary["mean_class_accuracy"], "loss": result.loss,
        # 95 % interval over resampled images (offroad.bootstrap: seeded, so the same on every run)
        **bootstrap.flat(bootstrap.intervals(result.per_image)),
        "checkpoint": str(checkpoint), "epoch": ckpt["epoch"], "split": cfg.split, "images": len(split),
        "per_class": summary["per_class"],
    }
    weighting = "class-weighted " if params.loss.class_weighted else ""
    header = (f"Evaluation of {checkpoint} (epoch {ckpt['epoch']}) on the {cfg.split} split "
              f"({len(split)} images, dataset-level scores from one confusion matrix)\n\n"
              f"Loss ({weighting}{params.loss.name}, mean per labelled pixel)  {result.loss:.4f}\n")
    table = format_summary(summary)
    epochs = f"\nTraining history ({artifacts.HISTORY}, * = best val mIoU)\n{history_table(history)}"
    with atomic.together():  # one set: all new or all as before
        atomic.write_json(artifacts.EVAL_METRICS, rounded(report, artifacts.DIGITS))
        atomic.write_text(artifacts.EVAL_TABLE, header + table + epochs)
        artifacts.write_per_class(sort_by_iou(summary["per_class"]))
        artifacts.write_confusion(result.cm, data.class_names)
        artifacts.write_per_image(split.names, result.per_image, data.class_names)
        artifacts.write_examples({"images": split.images[:keep], "masks": split.masks[:keep], "preds": result.preds,
                                  "names": np.array(split.names[:keep], dtype=str)})
    print(header + table, end="")


if __name__ == "__main__":
    run_cli(main)
