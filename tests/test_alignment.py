"""Labels stay aligned with their images through every resize: each label is the raw label at the centre of
its output pixel's footprint, the point the area-resized image is centred on."""
from fractions import Fraction
from math import floor

import cv2
import numpy as np
import pytest

from offroad.artifacts import load_split
from offroad.data import prepare_split, resize_labels
from tests.conftest import make_params

RAW_IDS = np.array([0, 100, 200, 300, 500, 550, 700, 800, 7100, 10000], np.uint16)


def centre_labels(labels: np.ndarray, width: int, height: int) -> np.ndarray:
    """The raw label under each output pixel's footprint centre, in exact rational arithmetic."""
    H, W = labels.shape
    rows = [floor((i + Fraction(1, 2)) * Fraction(H, height)) for i in range(height)]
    cols = [floor((j + Fraction(1, 2)) * Fraction(W, width)) for j in range(width)]
    return labels[np.ix_(rows, cols)]


def stripes(height: int, width: int) -> np.ndarray:
    """Class indices changing at every source column and row: every output pixel straddles a boundary."""
    return ((np.arange(height)[:, None] * 3 + np.arange(width)[None, :]) % 10).astype(np.uint8)


@pytest.mark.parametrize("source, target", [((540, 960), (266, 476)), ((126, 224), (56, 112)),
                                            ((266, 476), (540, 960)), ((100, 70), (33, 21))])
def test_resize_labels_samples_every_footprint_centre(source, target):
    labels = stripes(*source)
    height, width = target
    np.testing.assert_array_equal(resize_labels(labels, (width, height)), centre_labels(labels, width, height))


def test_prepared_masks_are_the_raw_labels_at_the_footprint_centres(tmp_path):
    data = make_params({"data.image_size": [476, 266]}).data
    raw = RAW_IDS[stripes(540, 960)]
    image = np.zeros((540, 960, 3), np.uint8)
    for folder, array in (("Color_Images", image), ("Segmentation", raw)):
        (tmp_path / "raw/train" / folder).mkdir(parents=True)
        assert cv2.imwrite(str(tmp_path / "raw/train" / folder / "a.png"), array)
    prepare_split(tmp_path / "raw", "train", tmp_path / "prepared", data, workers=1)
    mask = load_split(tmp_path / "prepared", "train").masks[0]
    np.testing.assert_array_equal(mask, centre_labels(stripes(540, 960), 476, 266))
