"""Augmentation: the fill of new mask pixels, and independent coin flips per transform."""
import numpy as np

from offroad.augment import build_augment
from tests.conftest import make_params

OFF = {"augment.hflip": 0.0, "augment.vflip": 0.0, "augment.affine.p": 0.0, "augment.blur.p": 0.0,
       "augment.color_jitter.p": 0.0}


def augmenter(**overrides):
    return build_augment(make_params({**OFF, **overrides}).augment, ignore_index=255)


def test_rotation_fills_new_mask_pixels_with_ignore_index_and_image_pixels_with_black():
    augment = augmenter(**{"augment.affine.p": 1.0, "augment.affine.rotate": 45.0, "augment.affine.shift": 0.0,
                           "augment.affine.scale": 0.0})
    image = np.full((64, 96, 3), 200, np.uint8)
    mask = np.zeros((64, 96), np.uint8)  # all Background: any 255 below is padding
    filled = 0
    for seed in range(10):
        img, m = augment(image, mask, seed)
        assert set(np.unique(m)) <= {0, 255}
        outside = img.max(axis=2) == 0  # pixels no source pixel reached
        assert (m[outside] == 255).all()
        filled += (m == 255).mean()
    assert filled / 10 > 0.05  # rotations up to 45 degrees leave corners uncovered


def flips(augment, seed):
    image = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    img, _ = augment(image, np.zeros((4, 6), np.uint8), seed)
    return np.array_equal(img, image[:, ::-1]) or np.array_equal(img, image[::-1, ::-1]), \
        np.array_equal(img, image[::-1]) or np.array_equal(img, image[::-1, ::-1])


def test_transforms_draw_their_coin_flips_independently():
    augment = augmenter(**{"augment.hflip": 0.5, "augment.vflip": 0.5})
    drawn = np.array([flips(augment, seed) for seed in range(400)])
    h, v = drawn.mean(0)
    both = (drawn[:, 0] & drawn[:, 1]).mean()
    assert abs(h - 0.5) < 0.08 and abs(v - 0.5) < 0.08
    # independent: P(h and v) = P(h) P(v); the same seed for both would make it P(h) (all or nothing)
    assert abs(both - h * v) < 0.06
    assert flips(augment, 3) == flips(augment, 3)  # a seed fixes the draw
