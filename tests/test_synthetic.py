import cv2
import numpy as np
import pytest

from offroad.data import UNKNOWN, class_lut
from offroad.synthetic import FLOWERS, LANDSCAPE, SKY, generate, write_dataset
from tests.conftest import REPORT_PIXELS, make_params

RAW = {"Background": 0, "Trees": 100, "Lush Bushes": 200, "Dry Grass": 300, "Dry Bushes": 500,
       "Ground Clutter": 550, "Logs": 700, "Rocks": 800, "Landscape": 7100, "Sky": 10000}


@pytest.fixture(scope="module")
def scenes():
    """32 train scenes at 240x135: images [N, H, W, 3] and raw masks [N, H, W]."""
    pairs = [generate(0, "train", i, 240, 135) for i in range(32)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def test_generate_is_deterministic_and_seeded_per_image():
    image, mask = generate(0, "train", 2, 96, 54)
    again = generate(0, "train", 2, 96, 54)
    assert image.dtype == np.uint8 and image.shape == (54, 96, 3)
    assert mask.dtype == np.uint16 and mask.shape == (54, 96)
    assert np.array_equal(image, again[0]) and np.array_equal(mask, again[1])
    for other in (generate(1, "train", 2, 96, 54), generate(0, "val", 2, 96, 54), generate(0, "train", 3, 96, 54)):
        assert not np.array_equal(image, other[0]) and not np.array_equal(mask, other[1])


def test_files_are_byte_identical_across_runs_counts_and_workers(tmp_path):
    write_dataset(tmp_path / "a", {"train": 3, "val": 1}, 7, 96, 54, workers=1)
    write_dataset(tmp_path / "b", {"train": 2, "val": 2}, 7, 96, 54, workers=2)
    a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.png"))
    assert len(a) == 8 and len(b) == 8
    common = set(a) & set(b)
    assert {p.name for p in common} == {"train_00000.png", "train_00001.png", "val_00000.png"}
    for rel in common:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_files_have_the_real_layout_and_format(tiny_dataset):
    lut = class_lut(make_params().data)  # the repo's class map
    seen = set()
    for split, count in (("train", 6), ("val", 3)):
        images = sorted((tiny_dataset.root / split / "Color_Images").iterdir())
        masks = sorted((tiny_dataset.root / split / "Segmentation").iterdir())
        assert [p.name for p in images] == [p.name for p in masks] and len(images) == count
        for image_path, mask_path in zip(images, masks):
            image = cv2.imread(str(image_path), cv2.IMREAD_UNCHANGED)
            mask = cv2.imread(str(mask_path), cv2.IMREAD_UNCHANGED)
            assert image.dtype == np.uint8 and image.shape == (126, 224, 3)
            assert mask.dtype == np.uint16 and mask.shape == (126, 224)
            ids = np.unique(mask)
            assert (lut[ids] != UNKNOWN).all(), f"{mask_path}: unmapped ids {ids}"
            seen.update(ids.tolist())
    assert FLOWERS in seen and set(RAW.values()) - {700} <= seen


def test_class_shares_are_close_to_the_report(scenes):
    _, masks = scenes
    counts = np.bincount(masks.ravel(), minlength=10001)
    counts[0] += counts[FLOWERS]  # params.yaml folds Flowers into Background
    total = sum(REPORT_PIXELS.values())
    for name, raw in RAW.items():
        share, target = counts[raw] / masks.size, REPORT_PIXELS[name] / total
        tolerance = 0.025 if target > 0.1 else 0.35 * target
        assert abs(share - target) < tolerance, f"{name}: {share:.4f} vs report {target:.4f}"


def test_pixels_look_like_their_labels(scenes):
    images, masks = scenes
    mean = {name: images[masks == raw].mean(0) for name, raw in RAW.items()}  # RGB
    assert mean["Sky"][2] > mean["Sky"][0] + 30  # blue
    for green in ("Lush Bushes", "Trees"):
        assert mean[green][1] > max(mean[green][0], mean[green][2]) + 10
    assert mean["Trees"].sum() < mean["Lush Bushes"].sum()  # darker green
    assert mean["Dry Grass"][0] > mean["Dry Grass"][2] + 40  # yellowish
    assert (masks[:, 0] == SKY).mean() > 0.95 and not (masks[:, -1] == SKY).any()
    rows = np.arange(masks.shape[1])[None, :, None]
    assert np.median(np.broadcast_to(rows, masks.shape)[masks == LANDSCAPE]) < masks.shape[1] * 0.6


def nearest_mean_accuracy(pixels_a: np.ndarray, pixels_b: np.ndarray) -> float:
    """Balanced accuracy of telling two pixel sets apart by the nearer class-mean colour."""
    a, b = pixels_a.astype(float), pixels_b.astype(float)
    ma, mb = a.mean(0), b.mean(0)
    right_a = (np.linalg.norm(a - ma, axis=1) < np.linalg.norm(a - mb, axis=1)).mean()
    right_b = (np.linalg.norm(b - mb, axis=1) < np.linalg.norm(b - ma, axis=1)).mean()
    return (right_a + right_b) / 2


@pytest.mark.parametrize("a, b", [("Lush Bushes", "Trees"), ("Dry Bushes", "Dry Grass"), ("Landscape", "Background")])
def test_the_reports_confusable_classes_overlap_in_colour(scenes, a, b):
    images, masks = scenes
    assert nearest_mean_accuracy(images[masks == RAW[a]], images[masks == RAW[b]]) < 0.8
    # The measure does separate distinct classes.
    assert nearest_mean_accuracy(images[masks == RAW["Sky"]], images[masks == RAW["Landscape"]]) > 0.9
