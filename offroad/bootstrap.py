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


def groups_scores(groups: list[list[np.ndarray]], weights: np.ndarray, score,
                  rng: np.random.Generator) -> list[tuple[dict, dict]]:
    """Each group's point scores (the mean of its runs') and resampled scores [R] per name, for groups of
    runs given as [N, K, K] per-image matrices of the same images.

    A resample draws the images (`weights`, the same draw for every run: paired) and, where some group has
    several runs, training noise: each group's mean moves by a normal draw of sd s/sqrt(runs), where s² is the
    variance of the runs' scores around their group's mean, pooled over the groups (df = runs − groups), and
    is itself redrawn on each resample from its sampling distribution (s²·df/chi²(df), one draw for all
    groups). So three seeds a side widen the intervals as a t-distribution with 4 degrees of freedom would;
    resampling three runs alone made them too narrow (a null was called a change 8-11 % of the time at a
    nominal 1.25 %, tests/test_noise.py). With one run in every group the trained models are held fixed.
    """
    points = [[score(cms.sum(0)) for cms in runs] for runs in groups]
    boots = [[score(resampled(cms, weights)) for cms in runs] for runs in groups]
    df = sum(map(len, groups)) - len(groups)
    spread = np.sqrt(df / rng.chisquare(df, len(weights))) if df else np.zeros(len(weights))
    effects = rng.standard_normal((len(groups), len(weights))) * spread
    pooled = {}
    for k in points[0][0]:
        deviations = [np.asarray([p[k] for p in group]) - np.mean([p[k] for p in group]) for group in points]
        pooled[k] = float(sum((d ** 2).sum() for d in deviations) / df) if df else 0.0
    return [({k: float(np.mean([p[k] for p in group])) for k in group[0]},
             {k: np.mean([b[k] for b in boot], axis=0) + np.sqrt(pooled[k] / len(group)) * effects[g]
              for k in boot[0]})
            for g, (group, boot) in enumerate(zip(points, boots))]


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

    Each resample draws N of the images (the same draw for every run of both sides: paired over images) and,
    with several runs on a side, training noise (groups_scores). A group's score is the mean of its runs'
    scores. The interval is at 1 − 5 %/`tests` (Bonferroni), so all `tests` verdicts of one report hold
    together at 95 %.
    {name: {"old", "new", "change", "low", "high", "verdict"}}: "better" when the whole interval of the change
    is above 0, "worse" when below, else "within noise".
    """
    weights = resample_weights(check_pairs([old, new]), resamples, seed)
    (point_old, boot_old), (point_new, boot_new) = groups_scores([old, new], weights, score,
                                                                 np.random.default_rng([seed, 1]))
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
