"""Phase 2 augmentations (albumentations 2): image and mask transformed together."""
from __future__ import annotations

import os
import numpy as np

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
import albumentations as A  # noqa: E402
import cv2  # noqa: E402

from offroad.config import Augment

def build_augment(cfg: Augment, ignore_index: int) -> "Augmenter | None":
    """Return `augment(image, mask, seed) -> (image, mask)`, or None when augmentation is off.

    Geometric transforms resample the mask with nearest neighbour and fill new pixels with
    ignore_index, so padding never counts as a class.
    """
    if not cfg.enabled:
        return None
    a, b, j = cfg.affine, cfg.blur, cfg.color_jitter
    compose = A.Compose([
        A.HorizontalFlip(p=cfg.hflip),
        A.VerticalFlip(p=cfg.vflip),
        A.Affine(translate_percent=(-a.shift, a.shift), scale=(1 - a.scale, 1 + a.scale),
                 rotate=(-a.rotate, a.rotate), interpolation=cv2.INTER_LINEAR,
                 mask_interpolation=cv2.INTER_NEAREST, border_mode=cv2.BORDER_CONSTANT,
                 fill=0, fill_mask=ignore_index, p=a.p),
        A.Blur(blur_limit=(3, b.limit), p=b.p),
        A.ColorJitter(brightness=j.brightness, contrast=j.contrast, saturation=j.saturation,
                      hue=j.hue, p=j.p),
    ], strict=True)

    return Augmenter(compose)


class Augmenter:
    """`augment(image, mask, seed) -> (image, mask)`; a class, not a closure, so spawned DataLoader workers
    can receive it pickled."""

    def __init__(self, compose: A.Compose):
        self.compose = compose

    def __call__(self, image: np.ndarray, mask: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        # Compose.set_random_seed gives every child the same seed, so their coin flips would
        # all agree (all-or-nothing): seed each transform independently instead.
        child_seeds = np.random.SeedSequence(seed).generate_state(len(self.compose.transforms))
        for transform, child in zip(self.compose.transforms, child_seeds):
            transform.set_random_seed(int(child))
        out = self.compose(image=image, mask=mask)
        return out["image"], out["mask"]
