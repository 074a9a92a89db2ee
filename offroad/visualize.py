"""The class colour palette and the mask pictures built from it (shared by plot and predict)."""
from __future__ import annotations

import colorsys

import numpy as np

# Index order of params.yaml's default classes: Background, Trees, Lush Bushes, Dry Grass, Dry Bushes,
# Ground Clutter, Logs, Rocks, Landscape, Sky.
PALETTE = np.array([
    [96, 96, 96],      # Background: grey
    [0, 100, 0],       # Trees: dark green
    [60, 220, 60],     # Lush Bushes: bright green
    [240, 225, 140],   # Dry Grass: straw
    [200, 120, 40],    # Dry Bushes: ochre
    [255, 60, 0],      # Ground Clutter: red-orange
    [255, 0, 255],     # Logs: magenta (rare, must stand out)
    [180, 160, 255],   # Rocks: lavender
    [130, 80, 40],     # Landscape: brown
    [120, 200, 255],   # Sky: light blue
], dtype=np.uint8)
IGNORE_COLOR = np.array([0, 0, 0], dtype=np.uint8)
ERROR_COLOR = np.array([255, 0, 0], dtype=np.uint8)


def palette(num_classes: int = len(PALETTE)) -> np.ndarray:
    """uint8 [K, 3]; classes beyond the fixed ten get evenly spaced hues."""
    extra = [colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.8, 0.9) for i in range(num_classes - len(PALETTE))]
    return np.concatenate([PALETTE, np.round(np.array(extra).reshape(-1, 3) * 255).astype(np.uint8)])[:num_classes]


def colorize(mask: np.ndarray, num_classes: int = len(PALETTE)) -> np.ndarray:
    """Class-index mask [H, W] -> RGB uint8 [H, W, 3]; ids >= num_classes (ignored pixels) are black."""
    mask = np.asarray(mask)
    lut = np.tile(IGNORE_COLOR, (max(int(mask.max(initial=0)) + 1, num_classes), 1))
    lut[:num_classes] = palette(num_classes)
    return lut[mask]


def overlay(image: np.ndarray, mask: np.ndarray, num_classes: int = len(PALETTE), alpha: float = 0.5) -> np.ndarray:
    """Blend the colour mask over the RGB image; ignored pixels keep the image."""
    blend = (1 - alpha) * image.astype(np.float32) + alpha * colorize(mask, num_classes).astype(np.float32)
    out = np.where((np.asarray(mask) < num_classes)[..., None], blend, image)
    return np.round(out).astype(np.uint8)


def error_map(image: np.ndarray, mask: np.ndarray, pred: np.ndarray, num_classes: int = len(PALETTE)) -> np.ndarray:
    """Dimmed grey image with wrong pixels in red and ignored pixels black."""
    grey = (image.astype(np.float32).mean(-1, keepdims=True) * 0.5).repeat(3, -1).astype(np.uint8)
    out = np.where((mask != pred)[..., None], ERROR_COLOR, grey)
    return np.where((mask >= num_classes)[..., None], IGNORE_COLOR, out)
