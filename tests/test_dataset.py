import json
import struct
import zlib

import cv2
import numpy as np
import pytest
import torch

from offroad.artifacts import ArtifactError, load_split
from offroad.data import SegmentationDataset, class_lut, map_mask, prepare_split
from offroad.raw import DataError, find_split, read_image, read_mask
from tests.conftest import make_params

DATA = make_params({"data.image_size": [28, 14]}).data
# The class map of params.yaml written out by hand: raw id -> class index (600 = Flowers -> Background).
BY_HAND = {0: 0, 600: 0, 100: 1, 200: 2, 300: 3, 500: 4, 550: 5, 700: 6, 800: 7, 7100: 8, 10000: 9}


def write_pair(split_dir, name, image, mask):
    for folder, array in (("Color_Images", image[..., ::-1]), ("Segmentation", mask)):
        (split_dir / folder).mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(split_dir / folder / name), array)


def make_split(split_dir, names=("b.png", "a.png", "c.png"), seed=0):
    """56x28 random RGB images and masks of every raw id (Flowers included); returns {name: (image, mask)}."""
    rng = np.random.default_rng(seed)
    pairs = {}
    for name in names:
        image = rng.integers(0, 256, (28, 56, 3), dtype=np.uint8)
        mask = rng.choice(np.array(list(BY_HAND), np.uint16), size=(28, 56))
        write_pair(split_dir, name, image, mask)
        pairs[name] = image, mask
    return pairs


def test_prepare_maps_raw_ids_and_resizes(tmp_path):
    pairs = make_split(tmp_path / "raw" / "train")
    assert prepare_split(tmp_path / "raw", "train", tmp_path / "out", DATA, workers=1) == 3
    split = load_split(tmp_path / "out", "train")
    assert split.names == ["a.png", "b.png", "c.png"] and len(split) == 3
    assert json.loads((tmp_path / "out" / "train" / "split.json").read_text())["names"] == ["a.png", "b.png", "c.png"]
    assert split.images.shape == (3, 14, 28, 3) and split.images.dtype == np.uint8
    assert split.masks.shape == (3, 14, 28) and split.masks.dtype == np.uint8
    assert isinstance(split.images, np.memmap) and isinstance(split.masks, np.memmap)
    for i, name in enumerate(split.names):
        image, raw = pairs[name]
        area = image.reshape(14, 2, 28, 2, 3).astype(float).mean(axis=(1, 3))  # exact 2x area downscale
        assert np.abs(split.images[i] - area).max() <= 1
        mapped = np.vectorize(BY_HAND.get)(raw)
        assert np.array_equal(split.masks[i], mapped[1::2, 1::2])  # 2x2 footprints, centres at (2i + 1, 2j + 1)
    flowers = pairs["a.png"][1] == 600
    assert flowers.any() and (np.vectorize(BY_HAND.get)(pairs["a.png"][1])[flowers] == 0).all()


def test_process_pool_gives_the_same_arrays(tmp_path):
    make_split(tmp_path / "raw" / "train", names=[f"{i:03d}.png" for i in range(12)])
    prepare_split(tmp_path / "raw", "train", tmp_path / "one", DATA, workers=1)
    prepare_split(tmp_path / "raw", "train", tmp_path / "two", DATA, workers=2)
    one, two = load_split(tmp_path / "one", "train"), load_split(tmp_path / "two", "train")
    assert one.names == two.names
    assert np.array_equal(one.images, two.images) and np.array_equal(one.masks, two.masks)


def test_ignore_raw_maps_to_ignore_index(tmp_path):
    data = make_params({"data.classes": [{"name": "Background", "raw": [0]}, {"name": "Sky", "raw": [10000]}],
                        "data.ignore_raw": [600]}).data
    raw = np.array([[0, 600, 10000]], np.uint16)
    assert map_mask(raw, class_lut(data), "x.png").tolist() == [[0, data.ignore_index, 1]]


def test_find_split_tolerates_one_extra_folder(tmp_path):
    root = tmp_path / "root"
    make_split(root / "Offroad" / "train")
    assert find_split(root, "train") == root / "Offroad" / "train"
    prepare_split(root, "train", tmp_path / "out", DATA, workers=1)
    assert len(load_split(tmp_path / "out", "train")) == 3
    with pytest.raises(DataError, match="no 'train' split"):
        find_split(tmp_path, "train")  # two folders deep is too deep
    make_split(root / "Copy" / "train")
    with pytest.raises(DataError, match="found more than once"):
        find_split(root, "train")


def test_stray_files_are_ignored_with_a_warning(tmp_path, capsys):
    make_split(tmp_path / "raw" / "train")
    (tmp_path / "raw" / "train" / "Color_Images" / "notes.txt").write_text("hello")
    (tmp_path / "raw" / "train" / "Segmentation" / "Thumbs.db").write_bytes(b"\0")
    prepare_split(tmp_path / "raw", "train", tmp_path / "out", DATA, workers=1)
    assert load_split(tmp_path / "out", "train").names == ["a.png", "b.png", "c.png"]
    err = capsys.readouterr().err
    assert "notes.txt" in err and "Thumbs.db" in err


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


BAD_INPUTS = {
    "missing root": (lambda d: None, "nope", "nope"),
    "missing split": (lambda d: None, "val", "'val'"),
    "image without mask": (lambda d: (d / "Segmentation" / "b.png").unlink(), "train", "b.png"),
    "mask without image": (lambda d: (d / "Color_Images" / "c.png").unlink(), "train", "c.png"),
    "empty split": (lambda d: [p.unlink() for p in d.rglob("*.png")], "train", "no PNG files"),
    "truncated image": (lambda d: _truncate(d / "Color_Images" / "b.png"), "train", "Color_Images/b.png"),
    "corrupt mask": (lambda d: (d / "Segmentation" / "a.png").write_bytes(b"not a png"), "train", "Segmentation/a.png"),
    "8-bit mask": (lambda d: cv2.imwrite(str(d / "Segmentation" / "c.png"), np.zeros((28, 56), np.uint8)),
                   "train", "c.png: mask is 8-bit"),
    "3-channel mask": (lambda d: cv2.imwrite(str(d / "Segmentation" / "a.png"), np.zeros((28, 56, 3), np.uint16)),
                       "train", "a.png: mask is 16-bit with 3 channel"),
    "unknown raw id": (lambda d: cv2.imwrite(str(d / "Segmentation" / "b.png"),
                                             np.array([[4321, 1234] * 28] * 28, np.uint16)),
                       "train", r"b.png: raw ids \[1234, 4321\] are not in data.classes"),
    "size mismatch": (lambda d: cv2.imwrite(str(d / "Segmentation" / "c.png"), np.zeros((14, 56), np.uint16)),
                      "train", "c.png: mask is 56x14 but its image is 56x28"),
    "dangling symlinks": (lambda d: [_dangle(d / f / "a.png") for f in ("Color_Images", "Segmentation")],
                          "train", r"Color_Images: 1 symbolic link\(s\) point at nothing: a.png"),
    "a mask as the image": (lambda d: cv2.imwrite(str(d / "Color_Images" / "a.png"), np.zeros((28, 56), np.uint16)),
                            "train", "a.png: a 16-bit single-channel PNG is a mask of class ids, not an image"),
    "decompression bomb": (lambda d: _bomb(d / "Color_Images" / "b.png", 30000, 30000), "train",
                           "b.png: 30000x30000 pixels, more than the 100,000,000 pixels allowed"),
}


def _dangle(path):
    path.unlink()
    path.symlink_to(path.with_name("gone.png"))


def _bomb(path, width, height):
    """A PNG whose header declares width x height pixels (its data is never reached)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_a_clear_error_and_keeps_the_previous_output(tmp_path, case):
    break_it, split, message = BAD_INPUTS[case]
    make_split(tmp_path / "raw" / "train")
    out = tmp_path / "out"
    prepare_split(tmp_path / "raw", "train", out, DATA, workers=1)
    before = {p.name: p.read_bytes() for p in (out / "train").iterdir()}
    break_it(tmp_path / "raw" / "train")
    root = tmp_path / "nope" if case == "missing root" else tmp_path / "raw"
    with pytest.raises(DataError, match=message):
        prepare_split(root, split, out, DATA, workers=2)
    assert sorted(p.name for p in out.iterdir()) == ["train"]  # no temporary folder left behind
    assert {p.name: p.read_bytes() for p in (out / "train").iterdir()} == before


def test_readers_reject_what_is_not_the_real_format(tmp_path):
    cv2.imwrite(str(tmp_path / "gray8.png"), np.zeros((4, 4), np.uint8))
    cv2.imwrite(str(tmp_path / "ids.png"), np.array([[10000, 7100]], np.uint16))
    assert read_mask(tmp_path / "ids.png").tolist() == [[10000, 7100]]
    with pytest.raises(DataError, match="8-bit with 1 channel"):
        read_mask(tmp_path / "gray8.png")
    with pytest.raises(DataError, match="missing.png"):
        read_image(tmp_path / "missing.png")
    assert read_image(tmp_path / "gray8.png").shape == (4, 4, 3)


def test_load_split_errors_name_the_folder(tmp_path):
    with pytest.raises(ArtifactError, match="dvc repro prepare"):
        load_split(tmp_path, "train")
    make_split(tmp_path / "raw" / "train")
    prepare_split(tmp_path / "raw", "train", tmp_path / "out", DATA, workers=1)
    meta = tmp_path / "out" / "train" / "split.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "names": ["a.png"]}))
    with pytest.raises(ArtifactError, match="do not match"):
        load_split(tmp_path / "out", "train")


def test_tiny_dataset_is_the_prepared_form_of_its_pngs(tiny_dataset):
    lut = class_lut(tiny_dataset.params.data)
    for split in (tiny_dataset.train, tiny_dataset.val):
        assert split.images.shape[1:] == (56, 112, 3)
        for i, name in enumerate(split.names):
            raw = read_mask(next(tiny_dataset.root.glob(f"*/Segmentation/{name}")))
            rows, cols = (2 * np.arange(56) + 1) * 126 // 112, (2 * np.arange(112) + 1) * 224 // 224  # footprint centres
            assert np.array_equal(split.masks[i], lut[raw][rows][:, cols])
        present = set(np.unique(split.masks).tolist())
        assert {3, 8, 9} <= present  # Dry Grass, Landscape, Sky


def test_dataset_items_and_augment_seeds(tiny_dataset):
    calls = []

    def record(image, mask, seed):
        calls.append(seed)
        return image[:, ::-1], mask[:, ::-1]  # non-contiguous views on purpose

    plain = SegmentationDataset(tiny_dataset.train)
    image, mask, i = plain[2]
    assert i == 2 and image.dtype == torch.uint8 and mask.dtype == torch.int64
    assert np.array_equal(image.numpy(), tiny_dataset.train.images[2])
    assert np.array_equal(mask.numpy(), tiny_dataset.train.masks[2])

    ds = SegmentationDataset(tiny_dataset.train, record, seed=5)
    flipped = ds[2][0]
    assert np.array_equal(flipped.numpy(), tiny_dataset.train.images[2][:, ::-1])
    ds[1], ds[2]
    ds[1, 2]
    SegmentationDataset(tiny_dataset.train, record, seed=6)[2]
    # (seed, epoch, index): (5, 0, 2), (5, 0, 1), (5, 0, 2), (5, 1, 2), (6, 0, 2)
    assert calls[0] == calls[2] and len({calls[0], calls[1], calls[3], calls[4]}) == 4


def test_augmented_batches_do_not_depend_on_worker_count(tiny_dataset):
    def jitter(image, mask, seed):
        noise = np.random.default_rng(seed).integers(0, 50, image.shape, dtype=np.uint8)
        return image + noise, mask

    def batches(workers):
        ds = SegmentationDataset(tiny_dataset.train, jitter, seed=3)
        keys = [(4, i) for i in range(len(ds))]  # epoch 4
        loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=workers, sampler=keys)
        return [b[0] for b in loader]

    serial, parallel = batches(0), batches(2)
    assert all(torch.equal(a, b) for a, b in zip(serial, parallel)) and len(serial) == 3
