import json
import shutil

import numpy as np
import pytest

from offroad.artifacts import label_counts
from offroad.class_weights import compute_weights, inverse_frequency, median_frequency
from stages import class_weights
from offroad.errors import PipelineError
from tests.conftest import REPORT_PIXELS, TINY, make_params, write_params

# The report's weight column, rounded to 4 decimals as printed.
REPORT_WEIGHTS = {"Sky": 0.0104, "Landscape": 0.0161, "Dry Grass": 0.0208, "Lush Bushes": 0.0655,
                  "Background": 0.0673, "Ground Clutter": 0.0895, "Trees": 0.1098, "Rocks": 0.3278,
                  "Dry Bushes": 0.3562, "Logs": 5.0}


def test_inverse_frequency_reproduces_the_reports_weights():
    names = list(REPORT_PIXELS)
    weights = inverse_frequency(np.array([REPORT_PIXELS[n] for n in names]), max_weight=5.0)
    assert {n: round(float(w), 4) for n, w in zip(names, weights)} == REPORT_WEIGHTS


def test_inverse_frequency_scales_with_max_weight_and_covers_absent_classes():
    counts = np.array([400, 0, 100, 50])
    weights = inverse_frequency(counts, max_weight=2.0)
    assert weights.tolist() == [0.25, 2.0, 1.0, 2.0]  # absent class weighs like the rarest
    assert np.allclose(inverse_frequency(counts, 6.0), 3 * weights)


def test_median_frequency_and_none():
    # freq = [1/7, 2/7, 4/7], median 2/7
    assert np.allclose(median_frequency(np.array([10, 20, 40])), [2.0, 1.0, 0.5])
    assert np.allclose(median_frequency(np.array([10, 0, 20, 40])), [2.0, 2.0, 1.0, 0.5])
    assert compute_weights("none", np.array([5, 0, 7]), 5.0).tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(PipelineError, match="no labelled pixels"):
        inverse_frequency(np.zeros(3), 5.0)


def test_pixel_counts_skip_ignore_index_and_do_not_depend_on_chunking():
    rng = np.random.default_rng(0)
    masks = rng.choice(np.array([0, 1, 2, 255], np.uint8), size=(7, 5, 6))
    expected = [int((masks == c).sum()) for c in range(4)]
    data = make_params({"data.classes": [{"name": str(c), "raw": [c]} for c in range(4)]}).data
    for chunk in (1, 3, 64):
        counts = label_counts(masks, "m", data, "", chunk)
        assert counts.dtype == np.int64 and counts.tolist() == expected  # exact past 2**53 pixels too


@pytest.mark.parametrize("method", ["inverse_frequency", "median_frequency", "none"])
def test_stage_writes_weights_and_stats(tiny_dataset, tmp_path, monkeypatch, method):
    monkeypatch.chdir(tmp_path)
    write_params("params.yaml", {**TINY, "class_weights.method": method, "class_weights.max_weight": 3.0})
    masks = np.array(tiny_dataset.train.masks)
    shutil.copytree(tiny_dataset.prepared / "train", "data/prepared/train")
    class_weights.main()

    out = json.loads((tmp_path / "data/class_weights.json").read_text())
    names = tiny_dataset.params.data.class_names
    assert out["method"] == method and out["max_weight"] == 3.0 and out["classes"] == names
    assert out["counts"] == {n: int((masks == i).sum()) for i, n in enumerate(names)}
    assert sum(out["counts"].values()) == masks.size
    assert sum(out["shares"].values()) == pytest.approx(1.0, abs=1e-5)
    counts = np.array([out["counts"][n] for n in names])
    expected = {"inverse_frequency": inverse_frequency(counts, 3.0), "median_frequency": median_frequency(counts),
                "none": np.ones(len(names))}[method]
    assert [out["weights"][n] for n in names] == pytest.approx(expected, rel=1e-12)
    stats = json.loads((tmp_path / "metrics/class_stats.json").read_text())
    assert stats == {n: {"pixels": out["counts"][n], "share": out["shares"][n], "weight": out["weights"][n]}
                     for n in names}


def test_stage_without_prepared_masks_says_what_to_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_params("params.yaml", TINY)
    with pytest.raises(PipelineError, match="dvc repro prepare"):
        class_weights.main()
    assert not (tmp_path / "data/class_weights.json").exists()


def test_a_class_with_one_pixel_is_present():
    np.testing.assert_allclose(inverse_frequency(np.array([1, 4, 0]), 2.0), [2.0, 0.5, 2.0])
