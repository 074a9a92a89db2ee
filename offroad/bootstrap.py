"""Bootstrap over images: how much a score would move on another draw of val images of the same kind.

A resample draws N of the N images with replacement and scores the sum of their confusion matrices with the
dataset-level definitions of offroad.metrics (mean over the classes present in that resample). The draws are
seeded, so the intervals are the same on every run. The paired form scores two models on the same resamples,
so what both find hard cancels out of their difference.
"""
from __future__ import annotations

import numpy as np

from offroad.metrics import SCORES, class_scores, dataset_scores

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
    if np.isnan(samples).all():  # a score no resample defines (a class absent from the images)
        return float("nan"), float("nan")
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


def run_draws(per_run: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[B] scores of a group of runs from [R, B] (each run's score on each image resample): each resample
    also draws R of the R runs with replacement and averages them (the second level of the bootstrap). The
    runs' spread is widened by sqrt(R / (R - 1)), so a group of a few seeds does not look steadier than it is."""
    runs, resamples = per_run.shape
    if runs == 1:
        return per_run[0]
    mean = per_run.mean(0)
    widened = mean + np.sqrt(runs / (runs - 1)) * (per_run - mean)
    return widened[rng.integers(0, runs, (resamples, runs)), np.arange(resamples)[:, None]].mean(1)


def group_scores(runs: list[np.ndarray], weights: np.ndarray, score, rng: np.random.Generator):
    """A group of runs' point scores (the mean of its runs') and [R]esampled scores (run_draws) per name."""
    point = [score(cms.sum(0)) for cms in runs]
    boot = [score(resampled(cms, weights)) for cms in runs]
    return ({k: float(np.mean([p[k] for p in point])) for k in point[0]},
            {k: run_draws(np.stack([b[k] for b in boot]), rng) for k in boot[0]})


def check_pairs(groups: list[list[np.ndarray]]) -> int:
    """The image count N of groups of runs' [N, K, K] matrices, which must all be of one shape."""
    shapes = {np.shape(cms) for runs in groups for cms in runs}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3 or not next(iter(shapes))[0]:
        raise ValueError(f"per-image matrices of shapes {sorted(shapes)} do not pair up")
    return next(iter(shapes))[0]


def verdict(low: float, high: float) -> str:
    return "better" if low > 0 else "worse" if high < 0 else "within noise"


def compare(old: list[np.ndarray], new: list[np.ndarray], score=dataset_scores, resamples: int = RESAMPLES,
            seed: int = SEED, tests: int = 1) -> dict[str, dict]:
    """new − old, each a group of runs given as [N, K, K] per-image matrices of the same N images in the same
    order; `score` maps a matrix stack [..., K, K] to {name: [...]} (default: the dataset-level SCORES).

    Each resample draws N of the images (the same draw for every run of both sides: paired over images)
    and R of each side's R runs. A group's score is the mean of its runs' scores. The interval is at
    1 − 5 %/`tests` (Bonferroni), so all `tests` verdicts of one report hold together at 95 %.
    {name: {"old", "new", "change", "low", "high", "verdict"}}: "better" when the whole interval of the change
    is above 0, "worse" when below, else "within noise".
    """
    weights = resample_weights(check_pairs([old, new]), resamples, seed)
    (point_old, boot_old), (point_new, boot_new) = (
        group_scores(runs, weights, score, np.random.default_rng([seed, i])) for i, runs in enumerate((old, new)))
    result = {}
    for k in point_old:
        low, high = _bounds(boot_new[k] - boot_old[k], 1 - (1 - LEVEL) / tests)
        result[k] = {"old": point_old[k], "new": point_new[k], "change": point_new[k] - point_old[k],
                     "low": low, "high": high, "verdict": verdict(low, high)}
    return result


def paired(old: np.ndarray, new: np.ndarray, resamples: int = RESAMPLES, seed: int = SEED) -> dict[str, dict]:
    """Paired bootstrap of new − old over the same images (row i of both is the same image), one run a side."""
    return compare([np.asarray(old)], [np.asarray(new)], resamples=resamples, seed=seed)


def class_iou(cms: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    """A `score` for compare: each class's IoU."""
    iou = class_scores(cms)["iou"]
    return {name: iou[..., k] for k, name in enumerate(names)}
