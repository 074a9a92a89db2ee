"""Stage `evaluate`: the kept checkpoint on the val split (which chose it) and the held-out test split."""
from __future__ import annotations

import numpy as np

from offroad import artifacts, atomic, bootstrap
from offroad.config import load_params
from offroad.errors import run_cli
from offroad.evaluation import Evaluation, Scoring, evaluate, image_features
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
                          artifacts.EXAMPLES, *artifacts.PER_IMAGE.values())
    checkpoint = artifacts.CHECKPOINTS[params.train.checkpoint]
    model, ckpt = load_segmenter(checkpoint, params.model, data.class_names, run.device)
    model = place(model, run)
    splits = {s: artifacts.load_split(artifacts.PREPARED, s, data) for s in (artifacts.HEADLINE, "val")}
    for name, split in splits.items():
        artifacts.label_counts(split.masks, artifacts.PREPARED / name, data, "there is nothing to score")
    history = artifacts.read_history()
    weights = artifacts.read_class_weights(data.class_names).to(run.device) if params.loss.class_weighted else None
    loss_fn = build_loss(params.loss, weights, data.ignore_index)
    keep = min(cfg.examples, len(splits[artifacts.HEADLINE]))
    results = {}
    for name, split in splits.items():
        images = Scoring(image_features(model, split.images, run), split.masks, np.arange(len(split)),
                         cfg.batch_size, keep if name == artifacts.HEADLINE else 0)
        results[name] = evaluate(model, loss_fn, images, run)

    summaries = {name: summarize(result.cm, data.class_names) for name, result in results.items()}
    report = {"epoch": ckpt["epoch"],
              **{name: split_report(summaries[name], results[name], len(splits[name])) for name in splits}}
    weighting = "class-weighted " if params.loss.class_weighted else ""
    text = "".join(
        f"Evaluation of {checkpoint} (epoch {ckpt['epoch']}, chosen on val) on the {name} split ({len(splits[name])} "
        f"images, dataset-level scores from one confusion matrix)\n\n"
        f"Loss ({weighting}{params.loss.name}, mean per labelled pixel)  {results[name].loss:.4f}\n"
        f"{format_summary(summaries[name])}\n" for name in splits)
    epochs = f"Training history ({artifacts.HISTORY}, * = best val mIoU)\n{history_table(history)}"
    test, headline = splits[artifacts.HEADLINE], results[artifacts.HEADLINE]
    with atomic.together():  # one set: all new or all as before
        atomic.write_json(artifacts.EVAL_METRICS, rounded(report, artifacts.DIGITS))
        atomic.write_text(artifacts.EVAL_TABLE, text + epochs)
        for name, split in splits.items():
            artifacts.write_per_image(split.names, results[name].per_image, data.class_names,
                                      artifacts.PER_IMAGE[name])
        artifacts.write_per_class(sort_by_iou(summaries[artifacts.HEADLINE]["per_class"]))
        artifacts.write_confusion(headline.cm, data.class_names)
        artifacts.write_examples({"images": test.images[:keep], "masks": test.masks[:keep], "preds": headline.preds,
                                  "names": np.array(test.names[:keep], dtype=str)})
    print(text, end="")


def split_report(summary: dict, result: Evaluation, images: int) -> dict:
    """One split's scores, mIoU with its 95 % interval over resampled images (offroad.bootstrap: seeded, so the
    same on every run). Per-class scores are in EVAL_TABLE and PER_CLASS, the other intervals in a review."""
    low, high = bootstrap.intervals(result.per_image)["miou"]
    return {"miou": summary["miou"], "miou_low": low, "miou_high": high, "mdice": summary["mdice"],
            "pixel_accuracy": summary["pixel_accuracy"], "mean_class_accuracy": summary["mean_class_accuracy"],
            "loss": result.loss, "images": images}


if __name__ == "__main__":
    run_cli(main)
