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
    filled = []
    for seed in range(10):
        img, m = augment(image, mask, seed)
        assert set(np.unique(m)) <= {0, 255}
        outside = img.max(axis=2) == 0  # pixels no source pixel reached
        assert (m[outside] == 255).all()
        assert outside.sum() >= 0.8 * (m == 255).sum()  # padding is black (edges blend: linear vs nearest)
        filled.append((m == 255).mean())
    assert np.mean(filled) > 0.05  # rotations up to 45 degrees leave corners uncovered
    assert len(set(filled)) > 5  # a new angle every time, not one fixed rotation


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


def block_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(mask == 1)
    return rows.min(), rows.max(), cols.min(), cols.max()


def test_affine_shift_moves_and_scale_resizes_within_their_ranges():
    image = np.full((100, 200, 3), 200, np.uint8)
    mask = np.zeros((100, 200), np.uint8)
    mask[40:60, 80:120] = 1  # a 20 x 40 block in the centre
    shift = augmenter(**{"augment.affine.p": 1.0, "augment.affine.rotate": 0.0, "augment.affine.scale": 0.0,
                         "augment.affine.shift": 0.1})
    scale = augmenter(**{"augment.affine.p": 1.0, "augment.affine.rotate": 0.0, "augment.affine.scale": 0.3,
                         "augment.affine.shift": 0.0})
    moved, sizes = set(), set()
    for seed in range(12):
        top, bottom, left, right = block_box(shift(image, mask, seed)[1])
        assert (bottom - top, right - left) == (19, 39)  # shifted, never resized
        assert abs(top - 40) <= 10 and abs(left - 80) <= 20  # at most 10 % of each side
        moved.add((top, left))
        top, bottom, left, right = block_box(scale(image, mask, seed)[1])
        height = bottom - top + 1
        assert 0.7 * 20 - 1 <= height <= 1.3 * 20 + 1 and abs((top + bottom) / 2 - 49.5) <= 1  # about the centre
        sizes.add(height)
    assert len(moved) > 6 and len(sizes) > 4


def test_blur_kernels_stay_within_the_limit():
    blur = augmenter(**{"augment.blur.p": 1.0, "augment.blur.limit": 5})
    image = np.zeros((21, 21, 3), np.uint8)
    image[10, 10] = 255  # one bright pixel: a k x k box blur spreads it over k x k pixels
    sides = set()
    for seed in range(20):
        out = blur(image, np.zeros((21, 21), np.uint8), seed)[0]
        rows, cols = np.nonzero(out.max(axis=2))
        sides.add((rows.max() - rows.min() + 1, cols.max() - cols.min() + 1))
    assert sides == {(3, 3), (5, 5)}


def test_color_jitter_with_zero_ranges_leaves_the_image_alone():
    still = augmenter(**{"augment.color_jitter.p": 1.0, "augment.color_jitter.brightness": 0.0,
                         "augment.color_jitter.contrast": 0.0, "augment.color_jitter.saturation": 0.0,
                         "augment.color_jitter.hue": 0.0})
    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    assert all(np.array_equal(still(image, np.zeros((16, 16), np.uint8), seed)[0], image) for seed in range(5))
