"""Bootstrap over images: how much a score would move on another draw of val images of the same kind.

A resample draws N of the N images with replacement and scores the sum of their confusion matrices with the
dataset-level definitions of offroad.metrics (mean over the classes present in that resample). The draws are
seeded, so the intervals are the same on every run. The paired form scores two models on the same resamples,
so what both find hard cancels out of their difference.
"""
from __future__ import annotations

import numpy as np

from offroad.metrics import SCORES, dataset_scores

RESAMPLES = 1000
SEED = 0
LEVEL = 0.95


def resample_weights(n_images: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """float64 [resamples, n_images]: how many times each resample draws each image (each row sums to n)."""
    draws = np.random.default_rng(seed).integers(0, n_images, (resamples, n_images))
    rows = np.arange(resamples)[:, None] * n_images
    return np.bincount((rows + draws).ravel(), minlength=resamples * n_images).reshape(resamples, n_images) * 1.0


def resampled(per_image: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """[R, K, K] confusion matrices of the resamples, from [N, K, K] per image and [R, N] draw counts."""
    n, k, _ = per_image.shape
    return (weights @ per_image.reshape(n, k * k).astype(np.float64)).reshape(-1, k, k)


def _bounds(samples: np.ndarray, level: float) -> tuple[float, float]:
    low, high = np.nanquantile(samples, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def intervals(per_image: np.ndarray, resamples: int = RESAMPLES, seed: int = SEED,
              level: float = LEVEL) -> dict[str, tuple[float, float]]:
    """Percentile interval of each score over image resamples: {score: (low, high)}."""
    per_image = np.asarray(per_image)
    if len(per_image) == 0:
        return {s: (float("nan"), float("nan")) for s in SCORES}
    boot = dataset_scores(resampled(per_image, resample_weights(len(per_image), resamples, seed)))
    return {s: _bounds(boot[s], level) for s in SCORES}


def flat(bounds: dict[str, tuple[float, float]]) -> dict[str, float]:
    """{"miou_low": .., "miou_high": .., ...}: flat keys, so `dvc metrics diff` lists each bound."""
    return {f"{s}_{end}": v for s, (low, high) in bounds.items() for end, v in (("low", low), ("high", high))}


def paired(old: np.ndarray, new: np.ndarray, resamples: int = RESAMPLES, seed: int = SEED,
           level: float = LEVEL) -> dict[str, dict]:
    """Paired bootstrap of new − old over the same images (row i of both is the same image).

    {score: {"old", "new", "change", "low", "high", "verdict"}}; the verdict is "better" when the whole
    interval of the change is above 0, "worse" when below, else "within noise".
    """
    old, new = np.asarray(old), np.asarray(new)
    if old.shape != new.shape or old.ndim != 3 or len(old) == 0:
        raise ValueError(f"paired: per-image matrices of shapes {old.shape} and {new.shape} do not pair up")
    weights = resample_weights(len(old), resamples, seed)
    boot_old, boot_new = dataset_scores(resampled(old, weights)), dataset_scores(resampled(new, weights))
    point_old, point_new = dataset_scores(old.sum(0)), dataset_scores(new.sum(0))
    result = {}
    for s in SCORES:
        low, high = _bounds(boot_new[s] - boot_old[s], level)
        verdict = "better" if low > 0 else "worse" if high < 0 else "within noise"
        result[s] = {"old": float(point_old[s]), "new": float(point_new[s]),
                     "change": float(point_new[s] - point_old[s]), "low": low, "high": high, "verdict": verdict}
    return result
