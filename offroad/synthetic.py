"""The embedded synthetic desert, in the real dataset's layout and format.

`<root>/<split>/Color_Images/NAME.png` (RGB, 8-bit) and `<root>/<split>/Segmentation/NAME.png`
(16-bit single-channel raw ids). Each image is drawn by its own generator seeded from
(seed, split, index): byte-identical across runs, and unchanged when the counts change.

Byte-identical across CPUs too: the drawing is numpy elementwise arithmetic (IEEE-exact whatever SIMD level
numpy dispatches to), transcendentals are the C library's scalar ones (`_libm`), and the resampling and blur
are written out here rather than taken from OpenCV, whose float kernels round differently per SIMD level
(tests/test_cross_cpu.py).
"""
from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from offroad.errors import check_interrupt, worker_pool
from offroad.progress import progress
from offroad.raw import IMAGES, MASKS

# Raw ids of the real masks.
BACKGROUND, TREES, LUSH, GRASS, DRY, CLUTTER, FLOWERS, LOGS, ROCKS, LANDSCAPE, SKY = (
    0, 100, 200, 300, 500, 550, 600, 700, 800, 7100, 10000)

def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(split.encode()), index]))


def _libm(fn: Callable[..., float], *arrays: np.ndarray) -> np.ndarray:
    """float32 `fn` elementwise through Python's math module: numpy's SIMD transcendentals differ by CPU."""
    return np.frompyfunc(fn, len(arrays), 1)(*arrays).astype(np.float32)


def _pow(x: np.ndarray, p: float) -> np.ndarray:
    return _libm(lambda v: math.pow(v, p), x)


def _cubic_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and weights [n_out, 4] of a bicubic resize (a = -0.75, half-pixel centres, edge
    pixels repeated), as OpenCV's INTER_CUBIC."""
    src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    base = np.floor(src)
    t = src - base
    a = -0.75
    w0 = ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a
    w1 = ((a + 2) * t - (a + 3)) * t * t + 1
    w2 = ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1
    weights = np.stack([w0, w1, w2, 1 - w0 - w1 - w2], axis=1).astype(np.float32)
    index = np.clip(base.astype(np.int64)[:, None] + np.arange(-1, 3), 0, n_in - 1)
    return index, weights


def resize_cubic(grid: np.ndarray, h: int, w: int) -> np.ndarray:
    """float32 [h, w] bicubic resize of a float32 grid, one pass per axis, taps summed in a fixed order."""
    rows, row_w = _cubic_taps(grid.shape[0], h)
    cols, col_w = _cubic_taps(grid.shape[1], w)
    tall = sum(grid[rows[:, k]] * row_w[:, k, None] for k in range(4))
    return sum(tall[:, cols[:, k]] * col_w[None, :, k] for k in range(4))


def blur3(img: np.ndarray, sigma: float) -> np.ndarray:
    """3x3 Gaussian blur of an [H, W, C] float32 image, edges mirrored without repeating the edge pixel
    (OpenCV's BORDER_REFLECT_101)."""
    side = math.exp(-0.5 / sigma**2)
    k = np.float32(side / (1 + 2 * side)), np.float32(1 / (1 + 2 * side))
    for axis in (0, 1):
        pad = [(1, 1) if a == axis else (0, 0) for a in range(img.ndim)]
        p = np.pad(img, pad, mode="reflect")
        n = img.shape[axis]
        img = (p.take(range(0, n), axis) * k[0] + p.take(range(1, n + 1), axis) * k[1]
               + p.take(range(2, n + 2), axis) * k[0])
    return img


def noise(rng: np.random.Generator, h: int, w: int, cells_y: float, cells_x: float) -> np.ndarray:
    """Smooth value noise, about 0..1, with cells_y x cells_x features over an h x w field."""
    grid = rng.random((max(2, round(cells_y)), max(2, round(cells_x))), dtype=np.float32)
    return resize_cubic(grid, h, w)


def fractal(rng: np.random.Generator, h: int, w: int, cells: float, octaves: int = 3) -> np.ndarray:
    """Sum of `octaves` noise layers, each twice as fine and half as strong, about 0..1."""
    cells_x = cells * w / h
    total = sum(0.5**k * noise(rng, h, w, cells * 2**k, cells_x * 2**k) for k in range(octaves))
    return total / (2 - 0.5 ** (octaves - 1))


@dataclass(frozen=True)
class Canvas:
    """The scene being drawn: its random stream, float32 RGB image [H, W, 3] and raw-id mask [H, W]."""
    rng: np.random.Generator
    img: np.ndarray
    lab: np.ndarray


@dataclass(frozen=True)
class Layout:
    """Where the scene's regions lie: pixel rows [H, 1], the horizon row, and per column [W] the skyline
    (the sky is above it) and the ground line (the ground is below it)."""
    rows: np.ndarray
    horizon: float
    skyline: np.ndarray
    ground: np.ndarray

    @property
    def sky(self) -> np.ndarray:
        return self.rows < self.skyline

    @property
    def below(self) -> np.ndarray:
        return self.rows >= self.ground


@dataclass(frozen=True)
class Spot:
    """Where an object stands, in pixels: (x, y) is the bottom centre of its box (a log's centre), and
    `size` its radius (a log's length)."""
    x: float
    y: float
    size: float


@dataclass(frozen=True)
class Texture:
    """A leafy/grainy texture: `cells` features over the box, `grain` its strength, `shade` how much
    darker the bottom of the box is."""
    cells: float
    grain: float
    shade: float


def _colour(rng: np.random.Generator, rgb: tuple[float, float, float], jitter: float) -> np.ndarray:
    return np.clip(np.array(rgb, np.float32) * rng.uniform(1 - jitter, 1 + jitter, 3), 0, 255).astype(np.float32)


def _profile(rng: np.random.Generator, width: int, knots: int) -> np.ndarray:
    """A smooth random curve over the image width, about 0..1."""
    return noise(rng, 1, width, 1, knots)[0]


def _stand(spot: Spot, h: int, w: int) -> tuple[int, int]:
    """Top-left corner (x0, y0) of an h x w box standing on `spot`."""
    return int(spot.x - w / 2), int(spot.y - h)


def _paste(canvas: Canvas, corner: tuple[int, int], shape: np.ndarray, colour: np.ndarray, raw: int) -> None:
    """Paint boolean `shape` with per-pixel `colour` at `corner` (x0, y0), clipped to the frame."""
    H, W = canvas.lab.shape
    h, w = shape.shape
    x0, y0 = corner
    xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + w, W), min(y0 + h, H)
    if xa >= xb or ya >= yb:
        return
    s = shape[ya - y0:yb - y0, xa - x0:xb - x0]
    canvas.img[ya:yb, xa:xb][s] = colour[ya - y0:yb - y0, xa - x0:xb - x0][s]
    canvas.lab[ya:yb, xa:xb][s] = raw


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in 0..1 over an h x w box."""
    return (np.arange(h, dtype=np.float32)[:, None] + 0.5) / h, (np.arange(w, dtype=np.float32)[None, :] + 0.5) / w


def _blob(rng: np.random.Generator, box: tuple[int, int], lobes: int, ragged: float) -> np.ndarray:
    """A bush-like union of ellipses with ragged edges, standing on the bottom of an h x w `box`."""
    h, w = box
    y, x = _grid(h, w)
    field = np.full((h, w), -1.0, np.float32)
    for _ in range(lobes):
        cx, cy = rng.uniform(0.3, 0.7), rng.uniform(0.45, 0.75)
        ax, ay = rng.uniform(0.18, 0.3), rng.uniform(0.22, 0.4)
        field = np.maximum(field, 1 - ((x - cx) / ax) ** 2 - ((y - cy) / ay) ** 2)
    field += ragged * (fractal(rng, h, w, max(3, h / 6), 2) - 0.5)
    return (field > 0) & (y < 0.97)


def _textured(rng: np.random.Generator, box: tuple[int, int], base: np.ndarray, texture: Texture) -> np.ndarray:
    """`base` with `texture` over an h x w `box`."""
    h, w = box
    y, _ = _grid(h, w)
    tex = 1 + texture.grain * (fractal(rng, h, w, texture.cells, 2) - 0.5)
    light = (1 + texture.shade * (0.5 - y)) * tex
    return base * light[..., None]


def _bush(canvas: Canvas, spot: Spot, base: np.ndarray, raw: int) -> None:
    rng = canvas.rng
    h, w = max(3, int(1.5 * spot.size)), max(3, int(2.4 * spot.size))
    shape = _blob(rng, (h, w), rng.integers(3, 7), 0.9)
    colour = _textured(rng, (h, w), base, Texture(cells=max(3, h / 4), grain=0.7, shade=0.6))
    _paste(canvas, _stand(spot, h, w), shape, colour, raw)


def _tree(canvas: Canvas, spot: Spot, leaf: np.ndarray, bark: np.ndarray) -> None:
    rng, r = canvas.rng, spot.size
    trunk_h = r * rng.uniform(0.8, 1.6)
    h, w = max(4, int(1.6 * r + trunk_h)), max(3, int(2.4 * r))
    y, x = _grid(h, w)
    canopy = np.zeros((h, w), bool)
    ch = int(1.7 * r)
    canopy[:ch] = _blob(rng, (ch, w), rng.integers(4, 8), 1.0)
    trunk = (np.abs(x - 0.5 + 0.05 * (y - 1)) < 0.045 + 0.02 * y) & (y > 0.3)
    wood = _textured(rng, (h, w), bark, Texture(cells=max(3, h / 8), grain=0.4, shade=0.3))
    leaves = _textured(rng, (h, w), leaf, Texture(cells=max(3, ch / 4), grain=0.8, shade=0.7))
    _paste(canvas, _stand(spot, h, w), canopy | trunk, np.where(trunk[..., None], wood, leaves), TREES)


def _rock(canvas: Canvas, spot: Spot, base: np.ndarray) -> None:
    rng = canvas.rng
    h, w = max(3, int(1.2 * spot.size)), max(3, int(2 * spot.size))
    y, x = _grid(h, w)
    radii = rng.uniform(0.55, 1.0, 8).astype(np.float32)
    angle = (_libm(math.atan2, y - 0.95, x - 0.5) + np.float32(np.pi)) / np.float32(2 * np.pi) * 8
    edge = np.interp(angle.ravel(), np.arange(9), np.append(radii, radii[0])).reshape(h, w)
    shape = np.sqrt(((x - 0.5) / 0.5) ** 2 + ((y - 0.95) / 0.95) ** 2) < edge
    lit = 1.25 - 0.5 * y - 0.25 * x + 0.25 * (fractal(rng, h, w, max(3, h / 3), 2) - 0.5)
    _paste(canvas, _stand(spot, h, w), shape, base * lit[..., None], ROCKS)


def _log(canvas: Canvas, spot: Spot, base: np.ndarray, *, thick: float) -> None:
    length = spot.size
    angle = canvas.rng.uniform(-0.4, 0.4)
    c, s = math.cos(angle), math.sin(angle)
    side = int(length * (abs(c) + abs(s))) + 3
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) - side / 2
    u, v = x * c + y * s, -x * s + y * c
    shape = (np.abs(u) < length / 2) & (np.abs(v) < thick / 2)
    streak = 1 + 0.3 * _libm(math.cos, v / max(thick, 1) * np.float32(np.pi)) - 0.15 * (np.abs(u) > length / 2 - thick)
    corner = int(spot.x - side / 2), int(spot.y - side / 2)  # centred on the spot
    _paste(canvas, corner, shape, base * streak[..., None], LOGS)


def _paint(canvas: Canvas, where: np.ndarray, rgb: np.ndarray, raw: int) -> None:
    canvas.img[where] = rgb[where]
    canvas.lab[where] = raw


def _patches(field: np.ndarray, region: np.ndarray, fraction: float) -> np.ndarray:
    """The `fraction` of `region` where `field` is highest."""
    return region & (field > np.quantile(field[region], 1 - fraction))


def _sky(canvas: Canvas, layout: Layout) -> np.ndarray:
    """Blue gradient paling towards the horizon, with clouds; returns the horizon haze colour."""
    rng = canvas.rng
    H, W = canvas.lab.shape
    top, haze = _colour(rng, (80, 130, 200), 0.15), _colour(rng, (195, 210, 222), 0.06)
    t = np.clip(layout.rows / layout.horizon, 0, 1)[..., None]
    rgb = np.broadcast_to(top + (haze - top) * _pow(t, 0.7), (H, W, 3))
    cloud = np.clip((fractal(rng, H, W, 3, 4) - rng.uniform(0.5, 0.75)) * 4, 0, 1)[..., None]
    _paint(canvas, layout.sky, rgb + (_colour(rng, (240, 240, 240), 0.04) - rgb) * cloud * 0.9, SKY)
    return haze


def _landscape(canvas: Canvas, layout: Layout, *, haze: np.ndarray, near: np.ndarray) -> None:
    """Hazy mountains lit from one side above the horizon, a banded plain below it."""
    rng, rows, skyline = canvas.rng, layout.rows, layout.skyline
    H, W = canvas.lab.shape
    far = _colour(rng, (140, 132, 140), 0.08)
    depth = np.clip((rows - skyline.min()) / (layout.ground.max() - skyline.min() + 1), 0, 1)[..., None]
    slope = np.clip(np.gradient(skyline) * W / H, -1, 1) * rng.choice([-1, 1])
    relief = np.where(rows < layout.horizon, 1 + 0.15 * slope, 0.88 + 0.24 * noise(rng, H, W, H / 12, W / 30))
    rgb = (far + (near - far) * _pow(depth, 0.8)) * (relief * (0.85 + 0.3 * fractal(rng, H, W, 6, 4)))[..., None]
    _paint(canvas, ~layout.sky & ~layout.below, rgb + (haze - rgb) * 0.4 * (1 - depth), LANDSCAPE)


def _ground(canvas: Canvas, layout: Layout, *, grass: np.ndarray, near: np.ndarray) -> None:
    """Streaky dry grass with bare terrain (labelled Landscape), sandy background patches reaching
    into the landscape band, and ground clutter."""
    rng, rows, horizon, below = canvas.rng, layout.rows, layout.horizon, layout.below
    H, W = canvas.lab.shape
    streaks = noise(rng, H, W, H / 10, W / 2.5) * (0.6 + 0.4 * fractal(rng, H, W, 4))
    _paint(canvas, below, grass * (0.75 + 0.45 * streaks)[..., None], GRASS)

    bare = _patches(fractal(rng, H, W, rng.uniform(2, 4), 6), below, rng.uniform(0.05, 0.2))
    _paint(canvas, bare, near * (0.85 + 0.3 * fractal(rng, H, W, 10, 3))[..., None], LANDSCAPE)

    sand = (0.6 * near + 0.4 * _colour(rng, (205, 185, 150), 0.05)) * rng.uniform(0.95, 1.1)
    sand = (sand + rng.normal(0, 4, 3)).astype(np.float32)
    reach = horizon + (layout.ground - horizon) * (0.2 + 0.6 * _profile(rng, W, 6))
    field = fractal(rng, H, W, rng.uniform(2, 5), 6) - np.clip((reach - rows) / (0.15 * H), 0, 1)  # fades above reach
    patches = _patches(field, np.broadcast_to(rows > horizon, field.shape), rng.uniform(0.085, 0.2))
    _paint(canvas, patches, sand * (0.9 + 0.2 * fractal(rng, H, W, 12, 3))[..., None], BACKGROUND)

    clutter = _patches(fractal(rng, H, W, H / 24, 2), below, rng.uniform(0.065, 0.22))
    dark, pale = _colour(rng, (90, 75, 60), 0.12), _colour(rng, (150, 135, 115), 0.12)
    rgb = dark + (pale - dark) * noise(rng, H, W, H / 8, W / 8)[..., None]
    _paint(canvas, clutter, rgb * (0.8 + 0.4 * noise(rng, H, W, H / 3, W / 3))[..., None], CLUTTER)


def _flowers(canvas: Canvas, layout: Layout) -> None:
    """A few clusters of bright dots (raw id 600, not one of the report's classes)."""
    rng, horizon = canvas.rng, layout.horizon
    H, W = canvas.lab.shape
    for _ in range(rng.poisson(3)):
        cx, cy = rng.uniform(0, W), rng.uniform(layout.ground.mean(), H)
        spread = H * 0.03 * (cy - horizon) / (H - horizon)
        petal = _colour(rng, [(235, 205, 60), (170, 100, 180), (240, 240, 230)][rng.integers(3)], 0.08)
        dots = np.zeros((H, W), np.uint8)
        for px, py in zip(rng.normal(cx, spread, 40), rng.normal(cy, spread / 2, 40)):
            cv2.circle(dots, (int(px), int(py)), max(1, round(H / 300)), 1, -1)
        _paint(canvas, dots > 0, np.broadcast_to(petal, canvas.img.shape), FLOWERS)


def _objects(canvas: Canvas, layout: Layout) -> None:
    """Bushes, trees, rocks and logs standing on the ground, drawn far to near, bigger when nearer."""
    rng, horizon, ground = canvas.rng, layout.horizon, layout.ground
    H, W = canvas.lab.shape
    lush, dry = _colour(rng, (110, 135, 65), 0.15), _colour(rng, (170, 140, 90), 0.1)
    leaf, bark = _colour(rng, (70, 100, 50), 0.15), _colour(rng, (95, 75, 55), 0.1)
    rock, wood = _colour(rng, (140, 128, 115), 0.12), _colour(rng, (125, 100, 75), 0.12)
    veg = rng.uniform(0.4, 1.6)  # vegetation density of this scene
    kinds = (["lush"] * rng.poisson(13 * veg) + ["dry"] * rng.poisson(3.5 * veg) + ["tree"] * rng.poisson(2.2 * veg)
             + ["rock"] * rng.poisson(7) + ["log"] * rng.poisson(1.0))
    placed = []
    for kind in kinds:
        bx = rng.uniform(0, W)
        top = ground[min(int(bx), W - 1)]
        placed.append((top + (H - top) * rng.uniform(0.02, 1.05) ** (0.6 if kind == "tree" else 1), bx, kind))
    # Each call draws the size before the colour jitter: the order the random stream is read in.
    for by, bx, kind in sorted(placed):
        p = 0.2 + (by - horizon) / (H - horizon)
        if kind == "lush":
            _bush(canvas, Spot(bx, by, H * rng.uniform(0.05, 0.12) * p), lush * rng.uniform(0.85, 1.15), LUSH)
        elif kind == "dry":
            _bush(canvas, Spot(bx, by, H * rng.uniform(0.045, 0.1) * p), dry * rng.uniform(0.85, 1.15), DRY)
        elif kind == "tree":
            _tree(canvas, Spot(bx, by, H * rng.uniform(0.08, 0.16) * p), leaf * rng.uniform(0.85, 1.15), bark)
        elif kind == "rock":
            _rock(canvas, Spot(bx, by, H * rng.uniform(0.035, 0.09) * p), rock * rng.uniform(0.85, 1.15))
        else:
            _log(canvas, Spot(bx, by, H * rng.uniform(0.12, 0.24) * p), wood, thick=max(1.5, H * 0.014 * p))


def generate(seed: int, split: str, index: int, width: int = 960, height: int = 540) -> tuple[np.ndarray, np.ndarray]:
    """One scene: np.ndarray uint8 [H, W, 3] and raw-id mask uint16 [H, W]."""
    rng = image_rng(seed, split, index)
    H, W = height, width
    rows = np.arange(H, dtype=np.float32)[:, None]
    img = np.zeros((H, W, 3), np.float32)
    lab = np.zeros((H, W), np.uint16)
    canvas = Canvas(rng, img, lab)

    # Sky above the skyline, the landscape band down to the ground line, ground below.
    horizon = H * rng.uniform(0.365, 0.465)
    skyline = horizon - H * rng.uniform(0.05, 0.2) * _pow(_profile(rng, W, rng.integers(3, 10)).clip(0, 1), 1.3)
    ground = horizon + H * (rng.uniform(0.14, 0.22) + 0.05 * (_profile(rng, W, 5) - 0.5))
    layout = Layout(rows, horizon, skyline, ground)

    haze = _sky(canvas, layout)
    grass, near = _colour(rng, (190, 165, 105), 0.08), _colour(rng, (182, 150, 112), 0.06)
    near = near + (grass - near) * rng.uniform(0.2, 0.7)  # the plain fades into the dry grass
    _landscape(canvas, layout, haze=haze, near=near)
    _ground(canvas, layout, grass=grass, near=near)
    _flowers(canvas, layout)
    _objects(canvas, layout)

    # Lighting (brightness, warmth), lens softness and sensor noise.
    warm = rng.uniform(-1, 1)
    light = rng.uniform(0.8, 1.15) * np.array([1 + 0.06 * warm, 1, 1 - 0.08 * warm], np.float32)
    img = blur3(img * light, rng.uniform(0.4, 0.9))
    img += rng.normal(0, rng.uniform(3, 8), img.shape).astype(np.float32)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8), lab


def sample_name(split: str, index: int) -> str:
    return f"{split}_{index:05d}.png"


def write_sample(root: Path, split: str, index: int, seed: int, width: int, height: int) -> None:
    image, mask = generate(seed, split, index, width, height)
    name = sample_name(split, index)
    for folder, array in ((IMAGES, image[..., ::-1]), (MASKS, mask)):
        if not cv2.imwrite(str(root / split / folder / name), array):
            raise OSError(f"could not write {root / split / folder / name}")


def write_dataset(root: str | Path, counts: dict[str, int], seed: int, width: int, height: int,
                  workers: int = 1) -> None:
    """Write `counts[split]` scenes per split under `root` in the real layout, with `workers` processes."""
    root = Path(root)
    for split in counts:
        for folder in (IMAGES, MASKS):
            (root / split / folder).mkdir(parents=True, exist_ok=True)
    splits = [split for split, n in counts.items() for _ in range(n)]
    indices = [i for n in counts.values() for i in range(n)]
    write = functools.partial(write_sample, root, seed=seed, width=width, height=height)
    with worker_pool(workers) as pool:
        done = pool.map(write, splits, indices, chunksize=4) if pool else map(write, splits, indices)
        for _ in progress(done, len(splits), "synthesize"):
            check_interrupt()
