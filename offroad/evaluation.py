"""The one evaluation routine: loss and confusion matrix of a model over a split.

Training feeds it cached backbone features of the val split every epoch; the evaluate stage feeds it
features computed from the images. Either way the loss is the pixel-weighted mean of the training loss
(offroad.losses.pixel_weight), so neither the batch size nor the number of processes changes it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from offroad import metrics
from offroad.losses import PixelLoss
from offroad.runtime import Run
from offroad.segmenter import Segmenter, predicted_labels

Features = Callable[[np.ndarray], torch.Tensor]  # image indices -> backbone features


@dataclass(frozen=True)
class Scoring:
    """The images to score: their features and masks, this process's share of them, and how many
    predictions to keep (the first `keep` of the share)."""
    features: Features
    masks: np.ndarray
    idx: np.ndarray
    batch_size: int
    keep: int = 0


@dataclass
class Evaluation:
    loss: float  # pixel-weighted mean loss over the split
    cm: torch.Tensor  # int64 [K, K] on the CPU, rows = ground truth
    preds: np.ndarray  # uint8 [E, H, W]: predictions for the first E of the indices given
    # int64 [len(idx), K, K]: one matrix per image of this process's share, in the order of idx (not all-reduced)
    per_image: np.ndarray | None = None


def eval_features(model: Segmenter, images: np.ndarray, run: Run) -> torch.Tensor:
    """Backbone features of uint8 images [B, H, W, 3], one image per forward: bf16 CPU kernels round differently
    for different batch shapes, and evaluation must not depend on the batch size."""
    with run.autocast():
        return torch.cat([model.features(torch.from_numpy(np.asarray(image)[None]).to(run.device))
                          for image in images])


def image_features(model: Segmenter, images: np.ndarray, run: Run) -> Features:
    """Features computed from the (memory-mapped) images on every call."""
    return lambda idx: eval_features(model, images[idx], run)


def evaluate(model: Segmenter, loss_fn: PixelLoss, images: Scoring, run: Run) -> Evaluation:
    """Score `model` on this process's share of `images`, all-reduced over the process group."""
    model.eval()
    K = run.num_classes
    cm = torch.zeros(K, K, dtype=torch.long, device=run.device)
    sums = torch.zeros(2, dtype=torch.float64, device=run.device)  # weighted loss, weight
    preds, per_image = [], []
    with torch.inference_mode():
        for start in range(0, len(images.idx), images.batch_size):
            b = images.idx[start:start + images.batch_size]
            target = torch.from_numpy(np.asarray(images.masks[b])).to(run.device).long()
            with run.autocast():
                logits = model.decode(images.features(b), target.shape[-2:])
            weight = loss_fn.pixel_weight(target)
            # a batch without labelled pixels has a NaN mean loss and weight 0: it adds nothing
            sums += torch.stack([torch.where(weight > 0, loss_fn(logits.float(), target) * weight, 0.0), weight])
            pred = predicted_labels(logits)
            cms = metrics.image_confusion_matrices(pred, target, K, run.ignore_index)
            cm += cms.sum(0)
            per_image.append(cms.cpu())
            if start < images.keep:
                preds.append(pred[:images.keep - start].to(torch.uint8).cpu())
    loss, weight = run.dist.sum(sums).tolist()
    kept = torch.cat(preds).numpy() if preds else np.zeros((0, *images.masks.shape[1:]), np.uint8)
    per_image = torch.cat(per_image).numpy() if per_image else np.zeros((0, K, K), np.int64)
    return Evaluation(loss / weight if weight else math.nan, run.dist.sum(cm).cpu(), kept, per_image)
