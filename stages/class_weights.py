"""Stage `class_weights`: per-class pixel counts over the prepared train split and the loss weights
derived from them (python -m stages.class_weights)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from stages.artifacts import write_json
from stages.errors import PipelineError, run_cli
from stages.params import load_params

MASKS = Path("data/prepared/train/masks.npy")
OUT = Path("data/class_weights.json")
STATS = Path("metrics/class_stats.json")


def pixel_counts(masks: np.ndarray, num_classes: int, chunk: int = 64) -> np.ndarray:
    """int64 [K]: pixels per class index over uint8 masks [N, H, W]; ignore_index (>= K) is not counted."""
    counts = np.zeros(256, np.int64)
    for start in range(0, len(masks), chunk):
        counts += np.bincount(np.asarray(masks[start:start + chunk]).ravel(), minlength=256)
    return counts[:num_classes]


def _fill_absent(weights: np.ndarray, present: np.ndarray) -> np.ndarray:
    # A class missing from the train split weighs like the rarest present one.
    weights[~present] = weights[present].max()
    return weights


def _present(counts: np.ndarray) -> np.ndarray:
    present = counts > 0
    if not present.any():
        raise PipelineError("class_weights: the train masks hold no labelled pixels")
    return present


def inverse_frequency(counts: np.ndarray, max_weight: float) -> np.ndarray:
    """The report's weights: w_c = max_weight * min_count / count_c, so the rarest class gets max_weight."""
    counts = np.asarray(counts, np.float64)
    present = _present(counts)
    weights = np.zeros_like(counts)
    weights[present] = max_weight * counts[present].min() / counts[present]
    return _fill_absent(weights, present)


def median_frequency(counts: np.ndarray) -> np.ndarray:
    """Median frequency balancing over the whole split: w_c = median(f) / f_c."""
    counts = np.asarray(counts, np.float64)
    present = _present(counts)
    freq = counts / counts.sum()
    weights = np.zeros_like(counts)
    weights[present] = np.median(freq[present]) / freq[present]
    return _fill_absent(weights, present)


def none(counts: np.ndarray) -> np.ndarray:
    return np.ones(len(counts))


def compute_weights(method: str, counts: np.ndarray, max_weight: float) -> np.ndarray:
    """Weights for class_weights.method (validated by params: none | inverse_frequency | median_frequency)."""
    if method == "inverse_frequency":
        return inverse_frequency(counts, max_weight)
    return median_frequency(counts) if method == "median_frequency" else none(counts)


def main() -> None:
    params = load_params()
    names, cfg = params.data.class_names, params.class_weights
    try:
        masks = np.load(MASKS, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise PipelineError(f"{MASKS}: cannot read the prepared train masks ({e}); run `dvc repro prepare`") from None
    counts = pixel_counts(masks, len(names))
    weights = compute_weights(cfg.method, counts, cfg.max_weight)
    shares = counts / max(counts.sum(), 1)
    write_json(OUT, {
        "method": cfg.method, "max_weight": cfg.max_weight, "classes": names,
        "counts": {n: int(c) for n, c in zip(names, counts)},
        "shares": {n: float(s) for n, s in zip(names, shares)},
        "weights": {n: float(w) for n, w in zip(names, weights)},
    })
    write_json(STATS, {n: {"pixels": int(c), "share": float(s), "weight": float(w)}
                       for n, c, s, w in zip(names, counts, shares, weights)})
    print(f"class_weights ({cfg.method}) over {len(masks)} train masks:")
    for n, c, s, w in sorted(zip(names, counts, shares, weights), key=lambda row: -row[1]):
        print(f"  {n:<15} {c:>12,} px {100 * s:6.2f} %  weight {w:.4f}")


if __name__ == "__main__":
    run_cli(main)
