"""Segmentation losses: (class-weighted) cross-entropy, and focal + soft Dice for the rare classes."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from offroad.config import Loss
from offroad.errors import PipelineError


class PixelLoss(nn.Module):
    """A batch's mean loss over its labelled pixels, with the class weights that weight the mean."""

    def __init__(self, weight: Tensor | None, ignore_index: int):
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)
        self.ignore_index = ignore_index

    def pixel_weight(self, target: Tensor) -> Tensor:
        """The normaliser of this loss's mean over `target` (see `pixel_weight`)."""
        return pixel_weight(target, self.weight, self.ignore_index)


class CrossEntropy(PixelLoss):
    """Mean over non-ignored pixels, weighted by class as nn.CrossEntropyLoss does; computed in fp32."""

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(logits.float(), target, weight=self.weight, ignore_index=self.ignore_index)


class FocalDice(PixelLoss):
    """focal_weight * focal + dice_weight * (1 - soft Dice).

    Focal: sum of alpha_t (1 - p_t)^gamma (-log p_t) over non-ignored pixels divided by the sum of alpha_t
    (alpha = class weights, or 1), so gamma = 0 is exactly the weighted cross-entropy.
    Dice: per class 2 sum(p_k y_k) / (sum p_k + sum y_k) over the batch's non-ignored pixels, averaged over
    the classes present in the target.
    """

    def __init__(self, weight: Tensor | None, ignore_index: int, gamma: float, focal_weight: float,
                 dice_weight: float):
        super().__init__(weight, ignore_index)
        self.gamma = gamma
        self.focal_weight, self.dice_weight = focal_weight, dice_weight

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        K = logits.shape[1]
        log_p = F.log_softmax(logits.float(), dim=1)
        valid = target != self.ignore_index
        t = torch.where(valid, target, 0)
        log_pt = log_p.gather(1, t.unsqueeze(1)).squeeze(1)
        pt = log_pt.exp()
        alpha = valid.float() if self.weight is None else self.weight[t] * valid
        focal = -(alpha * (1 - pt) ** self.gamma * log_pt).sum() / alpha.sum().clamp_min(1e-12)

        labels, v = t[valid], valid.float()
        intersection = torch.zeros(K, device=logits.device).index_add_(0, labels, pt[valid])
        target_sum = torch.zeros(K, device=logits.device).index_add_(0, labels, v[valid])
        prob_sum = (log_p.exp() * v.unsqueeze(1)).sum(dim=(0, 2, 3))
        dice = 2 * intersection / (prob_sum + target_sum).clamp_min(1e-12)
        present = (target_sum > 0).float()
        dice_loss = ((1 - dice) * present).sum() / present.sum().clamp_min(1)
        return self.focal_weight * focal + self.dice_weight * dice_loss


def build_loss(loss: Loss, class_weights: Tensor | None, ignore_index: int) -> PixelLoss:
    """Module (logits [B, K, H, W], target int64 [B, H, W]) -> scalar; class weights used iff loss.class_weighted."""
    if loss.class_weighted and class_weights is None:
        raise PipelineError("loss.class_weighted is true but no class weights were given")
    weight = class_weights.float() if loss.class_weighted else None
    if loss.name == "cross_entropy":
        return CrossEntropy(weight, ignore_index)
    return FocalDice(weight, ignore_index, loss.focal_gamma, loss.focal_weight, loss.dice_weight)


def pixel_weight(target: Tensor, class_weights: Tensor | None, ignore_index: int) -> Tensor:
    """The normaliser of a batch's mean loss: the summed class weight (or count) of its non-ignored pixels,
    float64. Loss x pixel_weight, summed over batches and divided by the summed weight, is the mean over a
    whole split, whatever the batching."""
    valid = target != ignore_index
    if class_weights is None:
        return valid.sum(dtype=torch.float64)
    K = len(class_weights)
    bins = torch.where(valid, target + 1, 0)  # bin 0: ignored pixels
    low, high = torch.aminmax(bins)
    if low < 0 or high > K:
        raise PipelineError(f"target class ids outside 0..{K - 1} (and not ignore_index {ignore_index})")
    return torch.bincount(bins.flatten(), minlength=K + 1)[1:].double() @ class_weights.double()
