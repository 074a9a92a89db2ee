"""The data path: raw PNG pairs -> prepared uint8 arrays -> torch samples.

Raw layout (the real dataset's, and the synthetic one's): `<root>/<split>/Color_Images/NAME.png`
(RGB) and `<root>/<split>/Segmentation/NAME.png` (16-bit single-channel raw ids), optionally under
one extra folder. Prepared layout: `<prepared>/<split>/{images.npy, masks.npy, names.txt}`.
"""
from __future__ import annotations

import functools
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch
from tqdm import tqdm

from stages.artifacts import atomic_dir
from stages.errors import PipelineError
from stages.params import Data

IMAGES, MASKS = "Color_Images", "Segmentation"
UNKNOWN = -1  # class_lut value of a raw id that data.classes does not map


class DataError(PipelineError):
    pass


def find_split(root: str | Path, split: str) -> Path:
    """The folder holding `Color_Images/` and `Segmentation/` for `split`: `root/split` or `root/*/split`."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data root {root} does not exist (data.root in params.yaml)")
    found = [d for d in [root / split, *sorted(root.glob(f"*/{split}"))]
             if (d / IMAGES).is_dir() and (d / MASKS).is_dir()]
    if not found:
        raise DataError(f"no '{split}' split under {root}: expected {root / split}/{IMAGES}/ and "
                        f"{root / split}/{MASKS}/ (or the same one folder deeper)")
    if len(found) > 1:
        raise DataError(f"'{split}' split found more than once under {root}: {', '.join(map(str, found))}")
    return found[0]


def _pngs(folder: Path) -> dict[str, Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file())
    stray = [p.name for p in files if p.suffix.lower() != ".png"]
    if stray:
        print(f"warning: ignoring {len(stray)} non-PNG file(s) in {folder}: {', '.join(stray[:5])}", file=sys.stderr)
    return {p.name: p for p in files if p.suffix.lower() == ".png"}


def list_pairs(split_dir: Path) -> list[tuple[str, Path, Path]]:
    """(name, image, mask) for every PNG pair of a split folder, sorted by name."""
    images, masks = _pngs(split_dir / IMAGES), _pngs(split_dir / MASKS)
    unpaired = ((IMAGES, MASKS, images.keys() - masks.keys()), (MASKS, IMAGES, masks.keys() - images.keys()))
    for what, other, names in unpaired:
        if names:
            shown = ", ".join(sorted(names)[:5]) + (" ..." if len(names) > 5 else "")
            raise DataError(f"{split_dir}: {len(names)} file(s) in {what}/ have no partner in {other}/: {shown}")
    if not images:
        raise DataError(f"{split_dir}: no PNG files in {IMAGES}/")
    return [(name, images[name], masks[name]) for name in sorted(images)]


def read_image(path: str | Path) -> np.ndarray:
    """RGB uint8 [H, W, 3]."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise DataError(f"{path}: cannot decode image (missing, corrupt or truncated PNG)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_mask(path: str | Path) -> np.ndarray:
    """Raw ids, uint16 [H, W]; anything but a 16-bit single-channel PNG is an error."""
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if mask is None:
        raise DataError(f"{path}: cannot decode mask (missing, corrupt or truncated PNG)")
    if mask.ndim != 2 or mask.dtype != np.uint16:
        channels = 1 if mask.ndim == 2 else mask.shape[2]
        raise DataError(f"{path}: mask is {mask.dtype.itemsize * 8}-bit with {channels} channel(s); "
                        "expected a 16-bit single-channel PNG of raw class ids")
    return mask


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


def load_pair(image_path: Path, mask_path: Path, lut: np.ndarray,
              size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Decode, check, map and resize one pair to `size` = (width, height)."""
    image, raw = read_image(image_path), read_mask(mask_path)
    if image.shape[:2] != raw.shape:
        raise DataError(f"{mask_path}: mask is {raw.shape[1]}x{raw.shape[0]} but its image is "
                        f"{image.shape[1]}x{image.shape[0]}")
    mask = map_mask(raw, lut, mask_path)
    return (cv2.resize(image, size, interpolation=cv2.INTER_AREA),
            cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST))


def prepare_split(root: str | Path, split: str, out_dir: str | Path, data: Data, workers: int) -> int:
    """Write `out_dir/split/{images.npy, masks.npy, names.txt}` from the raw PNGs of `split`; return the count.

    Built in a temporary sibling folder and renamed over `out_dir/split` only when complete.
    `workers` decoding processes (0 = all cores).
    """
    pairs = list_pairs(find_split(root, split))
    width, height = data.image_size
    load = functools.partial(load_pair, lut=class_lut(data), size=(width, height))
    with atomic_dir(Path(out_dir) / split) as tmp:
        images = np.lib.format.open_memmap(tmp / "images.npy", "w+", np.uint8, (len(pairs), height, width, 3))
        masks = np.lib.format.open_memmap(tmp / "masks.npy", "w+", np.uint8, (len(pairs), height, width))
        workers = min(workers or os.cpu_count() or 1, len(pairs))
        sources = ([image for _, image, _ in pairs], [mask for _, _, mask in pairs])
        pool = ProcessPoolExecutor(workers) if workers > 1 else None
        try:
            results = pool.map(load, *sources, chunksize=8) if pool else map(load, *sources)
            bar = tqdm(results, total=len(pairs), desc=f"prepare {split}", unit="img", disable=None)
            for i, (image, mask) in enumerate(bar):
                images[i], masks[i] = image, mask
        finally:
            if pool:
                pool.shutdown(cancel_futures=True)  # on error, stop at once instead of decoding the rest
        images.flush()
        masks.flush()
        del images, masks
        (tmp / "names.txt").write_text("".join(f"{name}\n" for name, _, _ in pairs))
    return len(pairs)


@dataclass(frozen=True)
class PreparedSplit:
    images: np.ndarray  # memmap uint8 [N, H, W, 3]
    masks: np.ndarray  # memmap uint8 [N, H, W], class index or ignore_index
    names: list[str]

    def __len__(self) -> int:
        return len(self.names)


def load_split(prepared_dir: str | Path, split: str) -> PreparedSplit:
    folder = Path(prepared_dir) / split
    try:
        images = np.load(folder / "images.npy", mmap_mode="r")
        masks = np.load(folder / "masks.npy", mmap_mode="r")
        names = (folder / "names.txt").read_text().splitlines()
    except (OSError, ValueError) as e:
        raise DataError(f"{folder}: prepared split missing or unreadable ({e}); run `dvc repro prepare`") from None
    if not (len(images) == len(masks) == len(names)) or images.shape[1:3] != masks.shape[1:]:
        raise DataError(f"{folder}: images {images.shape}, masks {masks.shape} and {len(names)} names do not match")
    return PreparedSplit(images, masks, names)


class SegmentationDataset(torch.utils.data.Dataset):
    """(image uint8 [H, W, 3], mask int64 [H, W], index); `augment(image, mask, seed=...)` is seeded
    from (seed, epoch, index) so samples do not depend on worker count or order."""

    def __init__(self, split: PreparedSplit, augment: Callable | None = None, seed: int = 0):
        self.split, self.augment, self.seed, self.epoch = split, augment, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        image, mask = np.array(self.split.images[i]), np.array(self.split.masks[i])
        if self.augment is not None:
            item_seed = int(np.random.SeedSequence([self.seed, self.epoch, i]).generate_state(1)[0])
            image, mask = self.augment(image, mask, seed=item_seed)
        return (torch.from_numpy(np.ascontiguousarray(image)),
                torch.from_numpy(np.ascontiguousarray(mask).astype(np.int64)), i)
