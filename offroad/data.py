"""The data path: raw PNG pairs (offroad.raw) -> class indices at the model's size -> prepared arrays
(offroad.artifacts) -> torch samples."""
from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from offroad.artifacts import PreparedSplit, write_split
from offroad.config import Data
from offroad.errors import check_interrupt, warn, worker_pool
from offroad.progress import progress
from offroad.raw import DataError, find_split, list_pairs, read_image, read_mask, split_folder

UNKNOWN = -1  # class_lut value of a raw id that data.classes does not map


def class_lut(data: Data) -> np.ndarray:
    """int16 [65536]: raw id -> class index, ignore_index for data.ignore_raw, UNKNOWN otherwise."""
    lut = np.full(65536, UNKNOWN, np.int16)
    for index, spec in enumerate(data.classes):
        lut[spec.raw] = index
    lut[list(data.ignore_raw)] = data.ignore_index
    return lut


def map_mask(raw: np.ndarray, lut: np.ndarray, source: str | Path) -> np.ndarray:
    """Class indices, uint8 [H, W]; raw ids the lut does not know are an error naming `source`."""
    mapped = lut[raw]
    if (mapped == UNKNOWN).any():
        ids = np.unique(raw[mapped == UNKNOWN]).tolist()
        raise DataError(f"{source}: raw ids {ids} are not in data.classes or data.ignore_raw")
    return mapped.astype(np.uint8)


def resize_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a label map to `size` = (width, height) that samples each output pixel's
    footprint centre, source ((j + 0.5) W / w, (i + 0.5) H / h), as INTER_AREA centres the image. (OpenCV's
    INTER_NEAREST takes the footprint's top-left corner, shifting labels by half an output pixel; its
    INTER_NEAREST_EXACT rounds a few centres the other way.) Integer arithmetic, so exact."""
    (w, h), (H, W) = size, labels.shape[:2]
    rows = (2 * np.arange(h) + 1) * H // (2 * h)
    cols = (2 * np.arange(w) + 1) * W // (2 * w)
    return labels[rows[:, None], cols]


def _area_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and integer weights [n_out, taps] of an area resize: the overlap of source pixel j,
    spanning [j n_out, (j + 1) n_out), with output pixel i, spanning [i n_in, (i + 1) n_in). Each row sums
    to n_in."""
    taps = -(-n_in // n_out) + 1
    start = np.arange(n_out)[:, None] * n_in
    index = np.minimum(start // n_out + np.arange(taps), n_in - 1)
    low = np.maximum(index * n_out, start)
    high = np.minimum((index + 1) * n_out, start + n_in)
    weights = np.maximum(high - low, 0)
    weights[:, 1:][index[:, 1:] == index[:, :-1]] = 0  # an index clamped at the far edge counts once
    return index, weights


def resize_area(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 [h, w, C] area resize of a uint8 [H, W, C] image to `size` = (w, h): each output pixel is the
    mean of the source area it covers, rounded half up. Integer arithmetic, so the same bytes on every CPU
    (OpenCV's INTER_AREA rounds in float, differently per SIMD level)."""
    (w, h), (H, W) = size, image.shape[:2]
    acc = np.int32 if 255 * W * H < 2**31 else np.int64
    cols, col_w = _area_taps(W, w)
    rows, row_w = _area_taps(H, h)
    tall = sum(image[rows[:, k]] * row_w[:, k, None, None].astype(acc) for k in range(rows.shape[1]))
    total = sum(tall[:, cols[:, k]] * col_w[:, k, None].astype(acc) for k in range(cols.shape[1]))
    return ((total + W * H // 2) // (W * H)).astype(np.uint8)


def load_pair(image_path: Path, mask_path: Path, lut: np.ndarray,
              size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Decode, check, map and resize one pair to `size` = (width, height); also the source (width, height)."""
    image, raw = read_image(image_path), read_mask(mask_path)
    if image.shape[:2] != raw.shape:
        raise DataError(f"{mask_path}: mask is {raw.shape[1]}x{raw.shape[0]} but its image is "
                        f"{image.shape[1]}x{image.shape[0]}")
    mask = map_mask(raw, lut, mask_path)
    return (resize_area(image, size),
            resize_labels(mask, size), (image.shape[1], image.shape[0]))


def warn_about_sizes(folder: Path, names: list[str], sizes: list[tuple[int, int]], size: tuple[int, int]) -> None:
    """Legal but most likely a mistake: images upscaled to data.image_size, or stretched to its aspect ratio."""
    w, h = size
    upscaled = [(n, s) for n, s in zip(names, sizes) if s[0] < w or s[1] < h]
    stretched = [(n, s) for n, s in zip(names, sizes) if abs(math.log(s[0] / s[1] * h / w)) > math.log(1.25)]
    for found, what in ((upscaled, "smaller than data.image_size, so they are upscaled"),
                        (stretched, "of an aspect ratio more than 25 % off data.image_size's, so they are stretched")):
        if found:
            shown = ", ".join(f"{n} ({s[0]}x{s[1]})" for n, s in found[:3]) + (" ..." if len(found) > 3 else "")
            warn(f"{len(found)} image(s) in {folder} are {what} to {w}x{h}: {shown}")


def split_folders(data: Data) -> dict[str, Path]:
    """Where each split's PNGs are: train and val under data.root, test at data.test_root."""
    return {"train": find_split(data.root, "train"), "val": find_split(data.root, "val"),
            "test": split_folder(data.test_root)}


def list_splits(folders: dict[str, Path]) -> dict[str, list[tuple[str, Path, Path]]]:
    """The pairs of every split, checked before anything is written: one folder for two splits is refused,
    names in more than one split are warned of."""
    splits = list(folders)
    for i, a in enumerate(splits):
        for b in splits[i + 1:]:
            if folders[a].resolve() == folders[b].resolve():
                raise DataError(f"the {a} and {b} splits are the same folder ({folders[b]}): each split needs "
                                "its own images (check data.root and data.test_root)")
    pairs = {split: list_pairs(folder) for split, folder in folders.items()}
    for i, a in enumerate(splits):
        for b in splits[i + 1:]:
            shared = sorted({n for n, _, _ in pairs[a]} & {n for n, _, _ in pairs[b]})
            if shared:
                shown = ", ".join(shared[:5]) + (" ..." if len(shared) > 5 else "")
                warn(f"{len(shared)} image name(s) are in both the {a} ({folders[a]}) and the {b} split "
                     f"({folders[b]}): {shown} "
                     f"(the {b} scores are optimistic if they are the same images)")
    return pairs


def prepare_split(root: str | Path, split: str, out_dir: str | Path, data: Data, workers: int,
                  pairs: list[tuple[str, Path, Path]] | None = None) -> int:
    """Write the prepared arrays of `split` (artifacts.write_split) from its raw PNGs (`pairs`, listed if not
    given); return the count. `workers` decoding processes (0 = all cores).
    """
    pairs = pairs if pairs is not None else list_pairs(find_split(root, split))
    load = functools.partial(load_pair, lut=class_lut(data), size=tuple(data.image_size))
    workers = min(workers or os.cpu_count() or 1, len(pairs))
    sources = ([image for _, image, _ in pairs], [mask for _, _, mask in pairs])
    with write_split(out_dir, split, [name for name, _, _ in pairs], data) as (images, masks):
        sizes = []
        with worker_pool(workers) as pool:
            results = pool.map(load, *sources, chunksize=8) if pool else map(load, *sources)
            for i, (image, mask, source_size) in enumerate(progress(results, len(pairs), f"prepare {split}")):
                check_interrupt()
                images[i], masks[i] = image, mask
                sizes.append(source_size)
    warn_about_sizes(sources[0][0].parent, [name for name, _, _ in pairs], sizes, tuple(data.image_size))
    return len(pairs)


class SegmentationDataset(torch.utils.data.Dataset):
    """(image uint8 [H, W, 3], mask int64 [H, W], index) for a key `(epoch, index)` or `index` (epoch 0);
    `augment(image, mask, seed=...)` is seeded from (seed, epoch, index), so samples depend neither on the
    worker count nor on the order. Keys carry the epoch so that persistent workers need no update."""

    def __init__(self, split: PreparedSplit, augment: Callable | None = None, seed: int = 0):
        self.split, self.augment, self.seed = split, augment, seed

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int]:
        epoch, i = key if isinstance(key, tuple) else (0, key)
        image, mask = np.array(self.split.images[i]), np.array(self.split.masks[i])
        if self.augment is not None:
            item_seed = int(np.random.SeedSequence([self.seed, epoch, i]).generate_state(1)[0])
            image, mask = self.augment(image, mask, seed=item_seed)
        return (torch.from_numpy(np.ascontiguousarray(image)),
                torch.from_numpy(np.ascontiguousarray(mask).astype(np.int64)), i)
