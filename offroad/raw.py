"""The raw dataset format (the real dataset's, and the synthetic one's).

`<root>/<split>/Color_Images/NAME.png` (RGB) and `<root>/<split>/Segmentation/NAME.png` (16-bit
single-channel raw class ids), optionally one folder deeper.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path

import cv2
import numpy as np

from offroad.errors import PipelineError, warn

IMAGES, MASKS = "Color_Images", "Segmentation"
MAX_PIXELS = 100_000_000  # a PNG with more is refused before it is decoded (a decompression bomb)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GREY = 0  # PNG colour type


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


def split_folder(folder: str | Path, param: str = "data.test_root") -> Path:
    """A split given as the folder that holds `Color_Images/` and `Segmentation/` itself."""
    folder = Path(folder)
    if not ((folder / IMAGES).is_dir() and (folder / MASKS).is_dir()):
        raise DataError(f"{folder}: expected {folder / IMAGES}/ and {folder / MASKS}/ ({param} in params.yaml)")
    return folder


def _pngs(folder: Path) -> dict[str, Path]:
    dangling = sorted(p.name for p in folder.iterdir() if p.is_symlink() and not p.exists())
    if dangling:
        raise DataError(f"{folder}: {len(dangling)} symbolic link(s) point at nothing: {', '.join(dangling[:5])}")
    files = sorted(p for p in folder.iterdir() if p.is_file())
    undecodable = [p.name for p in files if not _is_utf8(p.name)]
    if undecodable:  # the names are stored in split.json and drawn in figures: they must be text
        shown = ", ".join(repr(os.fsencode(n))[2:-1] for n in undecodable[:5])
        raise DataError(f"{folder}: {len(undecodable)} file name(s) are not valid UTF-8: {shown}; rename them")
    stray = [p.name for p in files if p.suffix.lower() != ".png"]
    if stray:
        warn(f"ignoring {len(stray)} non-PNG file(s) in {folder}: {', '.join(stray[:5])}")
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


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")  # a byte that is not UTF-8 reaches Python as a lone surrogate
    except UnicodeEncodeError:
        return False
    return True


def png_header(buf: np.ndarray) -> tuple[int, int, int, int] | None:
    """(width, height, bit depth, colour type) from a PNG's header bytes; None for another format."""
    if buf[:8].tobytes() != PNG_SIGNATURE or buf[12:16].tobytes() != b"IHDR" or len(buf) < 26:
        return None
    width, height = struct.unpack(">II", buf[16:24].tobytes())
    return width, height, int(buf[24]), int(buf[25])


def _decode(path: str | Path, flags: int, what: str) -> np.ndarray:
    """Decode from the file's bytes: cv2.imread takes the path as UTF-8 and crashes on any other name."""
    try:
        buf = np.fromfile(path, np.uint8)
    except FileNotFoundError:
        buf = np.zeros(0, np.uint8)
    except OSError as e:
        raise DataError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    header = png_header(buf)
    if header and header[0] * header[1] > MAX_PIXELS:
        raise DataError(f"{path}: {header[0]}x{header[1]} pixels, more than the {MAX_PIXELS:,} pixels allowed")
    if header and what == "image" and header[2:] == (16, GREY):
        raise DataError(f"{path}: a 16-bit single-channel PNG is a mask of class ids, not an image (were the "
                        f"masks given as images?)")
    decoded = cv2.imdecode(buf, flags) if buf.size else None
    if decoded is None:
        raise DataError(f"{path}: cannot decode {what} (missing, empty, corrupt or truncated)")
    return decoded


def read_image(path: str | Path) -> np.ndarray:
    """RGB uint8 [H, W, 3]."""
    return cv2.cvtColor(_decode(path, cv2.IMREAD_COLOR, "image"), cv2.COLOR_BGR2RGB)


def read_mask(path: str | Path) -> np.ndarray:
    """Raw ids, uint16 [H, W]; anything but a 16-bit single-channel PNG is an error."""
    mask = _decode(path, cv2.IMREAD_UNCHANGED, "mask")
    if mask.ndim != 2 or mask.dtype != np.uint16:
        channels = 1 if mask.ndim == 2 else mask.shape[2]
        raise DataError(f"{path}: mask is {mask.dtype.itemsize * 8}-bit with {channels} channel(s); "
                        "expected a 16-bit single-channel PNG of raw class ids")
    return mask
