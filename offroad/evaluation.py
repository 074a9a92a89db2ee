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
from offroad.losses import pixel_weight
from offroad.runtime import Run
from offroad.segmenter import Segmenter, predicted_labels

Features = Callable[[np.ndarray], torch.Tensor]  # image indices -> backbone features


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


def evaluate(model: Segmenter, features: Features, masks: np.ndarray, idx: np.ndarray, batch_size: int,
             loss_fn: torch.nn.Module, class_weights: torch.Tensor | None, run: Run, keep: int = 0) -> Evaluation:
    """Score `model` on the images `idx` (this process's share), all-reduced over the process group."""
    model.eval()
    cm = torch.zeros(run.num_classes, run.num_classes, dtype=torch.long, device=run.device)
    sums = torch.zeros(2, dtype=torch.float64, device=run.device)  # weighted loss, weight
    preds, per_image = [], []
    with torch.inference_mode():
        for start in range(0, len(idx), batch_size):
            b = idx[start:start + batch_size]
            target = torch.from_numpy(np.asarray(masks[b])).to(run.device).long()
            with run.autocast():
                logits = model.decode(features(b), target.shape[-2:])
            weight = pixel_weight(target, class_weights, run.ignore_index)
            # a batch without labelled pixels has a NaN mean loss and weight 0: it adds nothing
            sums += torch.stack([torch.where(weight > 0, loss_fn(logits.float(), target) * weight, 0.0), weight])
            pred = predicted_labels(logits)
            cms = metrics.image_confusion_matrices(pred, target, run.num_classes, run.ignore_index)
            cm += cms.sum(0)
            per_image.append(cms.cpu())
            if start < keep:
                preds.append(pred[:keep - start].to(torch.uint8).cpu())
    loss, weight = run.dist.sum(sums).tolist()
    kept = torch.cat(preds).numpy() if preds else np.zeros((0, *masks.shape[1:]), np.uint8)
    k = run.num_classes
    images = torch.cat(per_image).numpy() if per_image else np.zeros((0, k, k), np.int64)
    return Evaluation(loss / weight if weight else math.nan, run.dist.sum(cm).cpu(), kept, images)
