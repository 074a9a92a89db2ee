"""Loss weights from the per-class pixel counts of the train masks (offroad.artifacts.label_counts)."""
from __future__ import annotations

import numpy as np

from offroad.errors import PipelineError


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


def compute_weights(method: str, counts: np.ndarray, max_weight: float) -> np.ndarray:
    """Weights for class_weights.method: none | inverse_frequency | median_frequency."""
    if method == "inverse_frequency":
        return inverse_frequency(counts, max_weight)
    return median_frequency(counts) if method == "median_frequency" else np.ones(len(counts))
