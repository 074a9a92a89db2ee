"""Segment any folder of images with a trained checkpoint.

    python -m offroad.predict --images DIR --out DIR [--masks DIR] [--checkpoint PATH]

Writes OUT/masks/NAME.png (colour mask at the source size) and OUT/overlays/NAME.png (image | overlay).
With ground-truth masks (--masks, or a Segmentation/ folder beside DIR) it also scores the predictions
at the source size and writes OUT/metrics.json.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

from offroad import artifacts, atomic, guard
from offroad.config import Data, load_params
from offroad.data import class_lut, map_mask, resize_area, resize_labels
from offroad.errors import PipelineError, run_cli
from offroad.metrics import confusion_matrix, format_summary, rounded, summarize
from offroad.progress import progress
from offroad.raw import MASKS, read_image, read_mask
from offroad.runtime import Run, autocast, configure_cpu, resolve_device
from offroad.segmenter import Segmenter, load_segmenter, place, predicted_labels
from offroad.visualize import colorize, overlay

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class PredictError(PipelineError):
    pass


def list_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise PredictError(f"{folder}: not a folder of images")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise PredictError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    by_stem: dict[str, list[str]] = {}
    for p in images:
        by_stem.setdefault(p.stem.lower(), []).append(p.name)
    shared = [names for names in by_stem.values() if len(names) > 1]
    if shared:
        raise PredictError(f"{folder}: images share a name stem, so their outputs (STEM.png) and ground-truth masks "
                           f"would be mixed up: {'; '.join(', '.join(names) for names in shared[:5])}; rename them")
    return images


def check_out(out: Path, inputs: list[Path], force: bool = False) -> None:
    """The output folders must not be an input folder (their PNGs would be overwritten) nor, without --force,
    inside the pipeline's files or files git tracks (offroad.guard), and must be writable."""
    targets = (out / "masks", out / "overlays", out / "metrics.json")
    for sub in targets[:2]:
        clash = [p for p in inputs if p.resolve() == sub.resolve()]
        if clash:
            raise PredictError(f"--out {out}: {sub} is the input folder {clash[0]}; its files would be overwritten")
    for target in targets:
        reason = guard.reason(target)
        if reason and not force:
            raise PredictError(f"--out {out}: would write {target} ({reason}); choose another folder, or add --force")
    atomic.check_writable(*targets)


def mask_paths(images: list[Path], masks_dir: Path) -> list[Path]:
    """The ground-truth mask of each image: same file name, or same stem as .png."""
    if not masks_dir.is_dir():
        raise PredictError(f"{masks_dir}: mask folder not found")
    found = [masks_dir / p.name if (masks_dir / p.name).is_file() else masks_dir / f"{p.stem}.png" for p in images]
    missing = [p.name for p in found if not p.is_file()]
    if missing:
        raise PredictError(f"{masks_dir}: no mask for {len(missing)} image(s), e.g. {missing[:5]}")
    return found


def segment(segmenter: Segmenter, image: np.ndarray, size: tuple[int, int], device: torch.device,
            amp: bool, dtype: torch.dtype) -> np.ndarray:
    """Class ids [H, W] uint8 at the image's own size: model at `size` (w, h), nearest upsampling back."""
    h, w = image.shape[:2]
    resized = resize_area(image, size)
    with torch.inference_mode(), autocast(device, amp, dtype):
        logits = segmenter(torch.from_numpy(resized)[None].to(device))
    pred = predicted_labels(logits)[0].to(torch.uint8).cpu().numpy()
    return resize_labels(pred, (w, h))


def write_png(path: Path, rgb: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))
    if not ok:
        raise PredictError(f"{path}: PNG encoding failed")
    with atomic.atomic_path(path) as tmp:
        tmp.write_bytes(buf.tobytes())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m offroad.predict", description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=Path, required=True, help="folder of .png/.jpg images")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--masks", type=Path, help="ground-truth masks (default: Segmentation/ beside --images)")
    parser.add_argument("--checkpoint", type=Path, help="head checkpoint (default: per params train.checkpoint)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"),
                        help="the params file whose data and model sections the checkpoint was trained with "
                             "(default params.yaml)")
    parser.add_argument("--force", action="store_true",
                        help="allow --out inside a pipeline folder or over files git tracks")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_cpu()
    params = load_params(args.params)
    data, names = params.data, params.data.class_names
    images = list_images(args.images)
    sibling = args.images.parent / MASKS
    masks_dir = args.masks or (sibling if sibling.is_dir() else None)
    masks = mask_paths(images, masks_dir) if masks_dir else None
    check_out(args.out, [args.images, *([masks_dir] if masks_dir else [])], args.force)
    device = resolve_device(params.train.device)
    checkpoint = args.checkpoint or artifacts.CHECKPOINTS[params.train.checkpoint]
    run = Run.from_params(params, device)
    print(f"predict: {device}, {run.precision}", file=sys.stderr)
    segmenter, saved = load_segmenter(checkpoint, params.model, names, device)
    trained_at = saved["params"].get("data", {}).get("image_size") if isinstance(saved["params"], dict) else None
    if trained_at is not None and list(trained_at) != list(data.image_size):
        raise PredictError(f"{checkpoint} was trained at data.image_size {list(trained_at)}, {args.params} has "
                            f"{list(data.image_size)}: give the params it was trained with (--params)")
    segmenter = place(segmenter, run)

    new_out = not args.out.exists()
    try:  # the masks, overlays and metrics of one run: all new (an earlier run's folders replaced whole), or as before
        with atomic.together():
            with atomic.atomic_dir(args.out / "masks") as mask_dir, \
                    atomic.atomic_dir(args.out / "overlays") as overlay_dir:
                cm = predict_all(segmenter, images, masks, (mask_dir, overlay_dir), data, run)
            if masks:
                summary = summarize(cm, names)
                atomic.write_json(args.out / "metrics.json",
                                  rounded({"checkpoint": str(checkpoint), "images": len(images), **summary}))
    except BaseException:
        if new_out and args.out.is_dir() and not any(args.out.iterdir()):
            args.out.rmdir()
        raise
    if not masks:
        (args.out / "metrics.json").unlink(missing_ok=True)  # an earlier run's scores
    print(f"predict: wrote {len(images)} masks and overlays to {args.out}/ using {checkpoint}")
    if masks:
        print(f"scored against {masks_dir}:\n{format_summary(summary)}", end="")


def predict_all(segmenter: Segmenter, images: list[Path], masks: list[Path] | None, out: tuple[Path, Path],
                data: Data, run: Run) -> torch.Tensor:
    """Write each image's mask and overlay into the folders `out`; the confusion matrix against `masks` (zeros
    without)."""
    mask_dir, overlay_dir = out
    lut = class_lut(data)
    cm = torch.zeros(data.num_classes, data.num_classes, dtype=torch.int64)
    for i, path in enumerate(progress(images, len(images), "predict")):
        image = read_image(path)
        pred = segment(segmenter, image, tuple(data.image_size), run.device, run.amp, run.amp_dtype)
        write_png(mask_dir / f"{path.stem}.png", colorize(pred, data.num_classes))
        write_png(overlay_dir / f"{path.stem}.png", np.hstack([image, overlay(image, pred, data.num_classes)]))
        if masks:
            target = map_mask(read_mask(masks[i]), lut, masks[i])
            if target.shape != pred.shape:
                raise PredictError(f"{masks[i]}: mask is {target.shape[::-1]}, image {path} is {pred.shape[::-1]}")
            cm += confusion_matrix(torch.from_numpy(pred), torch.from_numpy(target), data.num_classes,
                                   data.ignore_index)
    return cm


def cli() -> None:
    """The console script."""
    run_cli(main, then="run the same command again")


if __name__ == "__main__":
    cli()
