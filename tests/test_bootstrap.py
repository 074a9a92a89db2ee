"""Per-image confusion matrices and the bootstrap intervals drawn from them (offroad.bootstrap)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from offroad import bootstrap, metrics

K = 4


def random_images(n: int, seed: int = 0, pixels: int = 400) -> np.ndarray:
    """[n, K, K] per-image matrices: varied accuracy per image; class 3 is in the first image only."""
    rng = np.random.default_rng(seed)
    cms = np.zeros((n, K, K), np.int64)
    for i in range(n):
        classes = K if i == 0 else K - 1
        truth = rng.integers(0, classes, pixels)
        right = rng.random(pixels) < rng.uniform(0.3, 0.9)
        pred = np.where(right, truth, rng.integers(0, K, pixels))
        np.add.at(cms[i], (truth, pred), 1)
    return cms


def test_image_confusion_matrices_count_each_image_on_its_own():
    rng = np.random.default_rng(1)
    target = rng.integers(0, K, (3, 5, 7))
    target[0, :2] = 255
    target[2] = 255  # an image without a labelled pixel
    pred = rng.integers(0, K, (3, 5, 7))
    cms = metrics.image_confusion_matrices(torch.from_numpy(pred), torch.from_numpy(target), K, 255).numpy()
    for i in range(3):
        expected = np.zeros((K, K), np.int64)
        for t, p in zip(target[i].ravel(), pred[i].ravel()):
            if t != 255:
                expected[t, p] += 1
        np.testing.assert_array_equal(cms[i], expected)
    assert cms[2].sum() == 0
    with pytest.raises(ValueError, match="outside 0..3"):
        metrics.image_confusion_matrices(torch.from_numpy(pred + 1), torch.from_numpy(target), K, 255)


def test_intervals_are_percentiles_of_the_scores_of_resampled_images():
    cms = random_images(30)
    resamples, seed = 300, 7
    # The same draws, scored one resample at a time by offroad.metrics (mean over the classes present).
    draws = np.random.default_rng(seed).integers(0, len(cms), (resamples, len(cms)))
    summaries = [metrics.summarize(cms[d].sum(0), [f"c{k}" for k in range(K)]) for d in draws]
    assert any(s["per_class"]["c3"]["iou"] is None for s in summaries)  # class 3 missing from some resamples
    got = bootstrap.intervals(cms, resamples, seed)
    for score in metrics.SCORES:
        values = np.array([s[score] for s in summaries])
        assert got[score] == pytest.approx(tuple(np.quantile(values, [0.025, 0.975])), abs=1e-12)
        point = metrics.summarize(cms.sum(0), [f"c{k}" for k in range(K)])[score]
        assert got[score][0] < point < got[score][1]


def test_intervals_are_seeded_and_narrow_with_more_images():
    cms = random_images(40)
    assert bootstrap.intervals(cms) == bootstrap.intervals(cms)
    assert bootstrap.intervals(cms, seed=1) != bootstrap.intervals(cms)
    width = {n: np.diff(bootstrap.intervals(np.tile(cms, (n, 1, 1)))["pixel_accuracy"])[0] for n in (1, 4)}
    assert 0.35 < width[4] / width[1] < 0.65  # ~ 1/sqrt(4)


def test_flat_keys_for_dvc_metrics():
    flat = bootstrap.flat({"miou": (0.1, 0.2), "mdice": (0.3, 0.4)})
    assert flat == {"miou_low": 0.1, "miou_high": 0.2, "mdice_low": 0.3, "mdice_high": 0.4}
