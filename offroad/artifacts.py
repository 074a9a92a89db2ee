"""The contract between stages: each file one stage writes and another reads, with its path, its writer
and its reader in one place. dvc.yaml declares the same paths as stage outputs (tests/test_dvc_workflow.py checks
it)."""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from offroad.atomic import atomic_dir, atomic_path, write_json, write_text
from offroad.config import MAX_SIDE, Data
from offroad.errors import PipelineError

SYNTHETIC = Path("data/synthetic")
PREPARED = Path("data/prepared")
SPLITS = ("train", "val", "test")  # training reads train and val (which picks the epoch); only evaluate reads test
SCORED = ("val", "test")  # what evaluate scores
HEADLINE = "test"  # the split every report leads with: no choice was made on it
CLASS_WEIGHTS = Path("data/class_weights.json")
CLASS_STATS = Path("metrics/class_stats.json")
CHECKPOINTS = {"best": Path("models/best.pt"), "final": Path("models/final.pt")}
LAST = Path("models/last.pt")  # resume state
LIVE = Path("dvclive")  # DVCLive's log of the train stage, written as it trains
HISTORY = LIVE / "plots/metrics"  # one <series>.tsv per history column: step (the epoch) and value
TRAIN_METRICS = LIVE / "metrics.json"  # the last epoch's values, the step, and the run's results
TRAIN_RUN = Path("metrics/run/train.json")  # how it ran (device, timings): not a dvc metric, so diffs stay quiet
EVAL_METRICS = Path("metrics/evaluate.json")
EVAL_TABLE = Path("metrics/evaluation_metrics.txt")
# per split: what the bootstrap intervals and the review report resample
PER_IMAGE = {split: Path(f"metrics/per_image/{split}.csv") for split in SCORED}
PER_CLASS = Path("plots/evaluate/per_class.csv")
CONFUSION = Path("plots/evaluate/confusion.csv")
EXAMPLES = Path("plots/evaluate/examples.npz")
FIGURES = Path("plots/images")
FIGURE_NAMES = ("all_metrics_curves.png", "class_distribution.png", "confusion_matrix.png", "lr_schedule.png",
                "per_class_iou.png", "predictions.png")  # what stages/plot.py draws

# one row per epoch (accuracies as fractions)
HISTORY_COLUMNS = ("epoch", "train_loss", "val_loss", "train_iou", "val_iou", "train_dice", "val_dice",
                   "train_acc", "val_acc", "lr")
PER_CLASS_COLUMNS = ("class", "iou", "dice", "precision", "recall", "pixel_share")
PER_IMAGE_COLUMNS = ("image", "truth", "prediction", "count")
DIGITS = 5  # rounding of the evaluation files, so `dvc metrics diff` stays readable


class ArtifactError(PipelineError):
    pass


# --- prepared split: data/prepared/<split>/{images.npy, masks.npy, split.json} ---------------------------

@dataclass(frozen=True)
class PreparedSplit:
    images: np.ndarray  # memmap uint8 [N, H, W, 3]
    masks: np.ndarray  # memmap uint8 [N, H, W], class index or ignore_index
    names: list[str]
    made_with: dict | None = None  # the data params prepare ran with, and a digest of the arrays

    def __len__(self) -> int:
        return len(self.names)

    def __reduce__(self):
        # Pickled for spawned DataLoader workers and torchrun processes: the memory maps' paths, not their
        # contents (1.45 GB for the real train split).
        if all(isinstance(a, np.memmap) and a.filename for a in (self.images, self.masks)):
            return _reopen, (self.images.filename, self.masks.filename, self.names, self.made_with)
        return PreparedSplit, (self.images, self.masks, self.names, self.made_with)


def _reopen(images: str, masks: str, names: list[str], meta: dict | None) -> PreparedSplit:
    return PreparedSplit(np.load(images, mmap_mode="r"), np.load(masks, mmap_mode="r"), names, meta)


def made_with(data: Data) -> dict:
    """The data params that decide a prepared split's contents."""
    return data.model_dump(mode="json", include={"image_size", "ignore_index", "ignore_raw", "classes"})


@contextlib.contextmanager
def write_split(prepared_dir: str | Path, split: str, names: list[str],
                data: Data) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield writable (images, masks) arrays for `names`; the split appears complete or not at all."""
    width, height = data.image_size
    with atomic_dir(Path(prepared_dir) / split) as tmp:
        images = np.lib.format.open_memmap(tmp / "images.npy", "w+", np.uint8, (len(names), height, width, 3))
        masks = np.lib.format.open_memmap(tmp / "masks.npy", "w+", np.uint8, (len(names), height, width))
        yield images, masks
        digest = hashlib.sha256()
        for array in (images, masks):
            array.flush()
            for start in range(0, len(array), 64):
                digest.update(np.ascontiguousarray(array[start:start + 64]).data)
        del images, masks
        write_json(tmp / "split.json", {"names": names, "made_with": made_with(data), "sha256": digest.hexdigest()})


def load_split(prepared_dir: str | Path, split: str, data: Data | None = None) -> PreparedSplit:
    """The prepared split, memory-mapped; with `data`, refuse arrays prepared with other data params."""
    folder = Path(prepared_dir) / split
    try:
        images = np.load(folder / "images.npy", mmap_mode="r")
        masks = np.load(folder / "masks.npy", mmap_mode="r")
        meta = json.loads((folder / "split.json").read_text())
        names = meta["names"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{folder}: prepared split missing or unreadable ({e}); run `dvc repro prepare`") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ArtifactError(f"{folder}/split.json: 'names' is not a list of file names; run `dvc repro prepare`")
    if images.dtype != np.uint8 or masks.dtype != np.uint8 or images.ndim != 4 or images.shape[3:] != (3,) \
            or masks.ndim != 3:
        raise ArtifactError(f"{folder}: images {images.dtype} {list(images.shape)} and masks {masks.dtype} "
                            f"{list(masks.shape)} are not uint8 [N, H, W, 3] and [N, H, W]; run `dvc repro prepare`")
    if not (len(images) == len(masks) == len(names)) or images.shape[1:3] != masks.shape[1:]:
        raise ArtifactError(f"{folder}: images {images.shape}, masks {masks.shape} and {len(names)} names do not match")
    if data is not None and meta.get("made_with") != made_with(data):
        stale = sorted(k for k, v in made_with(data).items() if (meta.get("made_with") or {}).get(k) != v)
        raise ArtifactError(f"{folder}: prepared with other data params ({', '.join(f'data.{k}' for k in stale)} "
                            "differ from params.yaml); run `dvc repro prepare`")
    if data is not None and images.shape[1:3] != tuple(data.image_size[::-1]):
        raise ArtifactError(f"{folder}: images are {images.shape[2]}x{images.shape[1]}, data.image_size is "
                            f"{data.image_size[0]}x{data.image_size[1]}; run `dvc repro prepare`")
    return PreparedSplit(images, masks, names, {"made_with": meta.get("made_with"), "sha256": meta.get("sha256")})


def label_counts(masks: np.ndarray, where: str | Path, data: Data, why: str, chunk: int = 64) -> np.ndarray:
    """int64 [K]: pixels per class over prepared masks [N, H, W]. A value that is neither a class index nor
    data.ignore_index (arrays edited by hand, or by other code), or no labelled pixel at all, is an error
    naming `where`; `why` says what a split without labels would break."""
    counts = np.zeros(256, np.int64)
    for start in range(0, len(masks), chunk):
        counts += np.bincount(np.asarray(masks[start:start + chunk]).ravel(), minlength=256)
    bad = [i for i in np.flatnonzero(counts).tolist() if i >= data.num_classes and i != data.ignore_index]
    if bad:
        raise ArtifactError(f"{where}: masks hold values {bad[:10]} that are neither a class index "
                            f"(0..{data.num_classes - 1}) nor data.ignore_index {data.ignore_index}; "
                            "run `dvc repro prepare`")
    if counts[:data.num_classes].sum() == 0:
        raise ArtifactError(f"{where}: no labelled pixel in the masks (all are data.ignore_index: raw ids in "
                            f"data.ignore_raw), so {why}")
    return counts[:data.num_classes]


# --- class weights: data/class_weights.json and metrics/class_stats.json ---------------------------------

def write_class_weights(names: list[str], method: str, max_weight: float, counts: np.ndarray,
                        weights: np.ndarray) -> None:
    shares = counts / max(counts.sum(), 1)
    write_json(CLASS_WEIGHTS, {
        "method": method, "max_weight": max_weight, "classes": names,
        "counts": {n: int(c) for n, c in zip(names, counts)},
        "shares": {n: float(s) for n, s in zip(names, shares)},
        "weights": {n: float(w) for n, w in zip(names, weights)},
    })
    write_json(CLASS_STATS, {n: {"pixels": int(c), "share": float(s), "weight": float(w)}
                             for n, c, s, w in zip(names, counts, shares, weights)})


def read_class_weights(class_names: list[str], path: str | Path = CLASS_WEIGHTS) -> torch.Tensor:
    """float32 [K] in class index order."""
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, dict) or data.get("classes") != list(class_names):
        found = data.get("classes") if isinstance(data, dict) else None
        raise ArtifactError(f"{path}: classes {found} differ from params.yaml {list(class_names)} "
                            "(rerun `dvc repro class_weights`)")
    weights = data.get("weights")
    values = [weights.get(name) if isinstance(weights, dict) else None for name in class_names]
    bad = [name for name, w in zip(class_names, values)
           if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0]
    if bad:
        raise ArtifactError(f"{path}: 'weights' lacks a finite non-negative number for {bad}")
    return torch.tensor(values, dtype=torch.float32)


def read_class_stats(path: Path = CLASS_STATS) -> dict[str, dict]:
    return _read_json(path)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path}: not found (run `dvc repro`)") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from None


# --- train results: dvclive/metrics.json (DVCLive's summary) and metrics/run/train.json (how it ran) --------

RESULT_FIELDS = ("best_epoch", "best_val_iou", "epochs_run")  # numbers a rerun reproduces: `dvc metrics diff`


def write_run_facts(path: Path, summary: dict) -> None:
    """What describes how the run ran, not its result (device, precision, timings, work saved), to `path`
    (TRAIN_RUN, outside `dvc metrics diff`); the results go to DVCLive's summary (offroad.training.close_log)."""
    write_json(path, {k: v for k, v in summary.items() if k not in RESULT_FIELDS})


# --- training history: DVCLive's dvclive/plots/metrics/<series>.tsv ----------------------------------------

def history_metric(column: str) -> str:
    """The DVCLive metric a history column is logged as: train_loss -> train/loss, lr -> lr."""
    return column.replace("_", "/", 1)


HISTORY_FILES = tuple(HISTORY / f"{history_metric(c)}.tsv" for c in HISTORY_COLUMNS[1:])


def read_history(folder: str | Path = HISTORY) -> dict[str, np.ndarray]:
    """One float array per HISTORY_COLUMNS column, by epoch, from DVCLive's series."""
    series = {}
    try:
        for column in HISTORY_COLUMNS[1:]:
            name = history_metric(column)
            with open(Path(folder) / f"{name}.tsv", newline="") as f:
                series[column] = {int(r["step"]): float(r[name.rpartition("/")[2]])
                                  for r in csv.DictReader(f, delimiter="\t")}
    except FileNotFoundError as e:
        raise ArtifactError(f"{e.filename}: not found (run `dvc repro train`)") from None
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{folder}: bad column or value ({e}) in DVCLive's series") from None
    epochs = sorted(series["train_loss"])
    if not epochs:
        raise ArtifactError(f"{folder}: no epochs")
    if any(sorted(s) != epochs for s in series.values()):
        raise ArtifactError(f"{folder}: the series cover different epochs (an interrupted run?); "
                            "rerun `dvc repro train`")
    return {"epoch": np.array(epochs, np.float64), **{c: np.array([s[e] for e in epochs]) for c, s in series.items()}}


# --- evaluation tables: plots/evaluate/{per_class,confusion}.csv -----------------------------------------

def _csv(rows: list[list]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def write_per_class(per_class: list[tuple[str, dict]], path: Path = PER_CLASS) -> None:
    """(class, scores) rows in the given order; classes without an IoU (absent from the split) are left out."""
    rows = [[name, *(round(c[k], DIGITS) for k in PER_CLASS_COLUMNS[1:])] for name, c in per_class
            if c["iou"] is not None]
    write_text(path, _csv([list(PER_CLASS_COLUMNS), *rows]))


def read_per_class(path: Path = PER_CLASS) -> list[dict]:
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows, header = list(reader), reader.fieldnames or []
    except FileNotFoundError:
        raise ArtifactError(f"{path}: not found (run `dvc repro evaluate`)") from None
    missing = [c for c in PER_CLASS_COLUMNS if c not in header]
    if missing or not rows:
        raise ArtifactError(f"{path}: " + (f"missing columns {missing}" if missing else "no rows"))
    try:
        return [{"class": r["class"], **{c: float(r[c]) for c in PER_CLASS_COLUMNS[1:]}} for r in rows]
    except ValueError as e:
        raise ArtifactError(f"{path}: {e}") from None


def write_confusion(cm: torch.Tensor, names: list[str], path: Path = CONFUSION) -> None:
    write_text(path, _csv([["truth/prediction", *names], *([n, *row] for n, row in zip(names, cm.tolist()))]))


def read_confusion(path: Path = CONFUSION) -> tuple[np.ndarray, list[str]]:
    """Count matrix (rows = truth) and the class names from the header."""
    try:
        with open(path, newline="") as f:
            header, *rows = list(csv.reader(f))
        names = header[1:]
        if [r[0] for r in rows] != names or any(len(r) != len(header) for r in rows):
            raise ValueError
        return np.array([[int(v) for v in r[1:]] for r in rows], dtype=np.int64).reshape(len(names), -1), names
    except (FileNotFoundError, ValueError):
        raise ArtifactError(f"{path}: not found, or not a square matrix with the header's classes as rows") from None


# --- per-image confusion matrices: metrics/per_image/<split>.csv ------------------------------------------
# Long form, nonzero cells only: one row per (image, truth class, predicted class), images in split order.

def write_per_image(names: list[str], per_image: np.ndarray, class_names: list[str], path: Path) -> None:
    rows = [[names[i], class_names[t], class_names[p], int(per_image[i, t, p])]
            for i, t, p in zip(*np.nonzero(per_image))]
    write_text(path, _csv([list(PER_IMAGE_COLUMNS), *rows]))


def parse_per_image(text: str, class_names: list[str], source: str | Path) -> tuple[list[str], np.ndarray]:
    """(image names in file order, int64 [N, K, K]) from the text of a per-image file. Images without a labelled
    pixel have no row: they would add nothing to any score."""
    index = {name: i for i, name in enumerate(class_names)}
    if text and not text.endswith("\n"):
        raise ArtifactError(f"{source}: the last row ends without a newline: the file was cut off")
    reader = csv.DictReader(io.StringIO(text))
    if tuple(reader.fieldnames or ()) != PER_IMAGE_COLUMNS:
        raise ArtifactError(f"{source}: header {reader.fieldnames} is not {','.join(PER_IMAGE_COLUMNS)}")
    images: dict[str, int] = {}
    cells: dict[tuple[int, int, int], int] = {}
    for line, r in enumerate(reader, start=2):
        try:
            cell = images.setdefault(r["image"], len(images)), index[r["truth"]], index[r["prediction"]]
            count = int(r["count"])
        except KeyError as e:
            raise ArtifactError(f"{source}: line {line}: class {e} is not in data.classes {list(class_names)}") from None
        except (TypeError, ValueError) as e:
            raise ArtifactError(f"{source}: line {line}: bad row ({e})") from None
        if not 0 < count <= MAX_SIDE ** 2:
            raise ArtifactError(f"{source}: line {line}: count {count} is not a pixel count (1..{MAX_SIDE ** 2})")
        if cell in cells:
            raise ArtifactError(f"{source}: line {line}: a second row for image {r['image']!r}, "
                                f"{r['truth']} -> {r['prediction']}")
        cells[cell] = count
    counts = np.zeros((len(images), len(class_names), len(class_names)), np.int64)
    for (i, t, p), c in cells.items():
        counts[i, t, p] = c
    return list(images), counts


def read_per_image(class_names: list[str], path: Path) -> tuple[list[str], np.ndarray]:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ArtifactError(f"{path}: not found (run `dvc repro evaluate`)") from None
    return parse_per_image(text, class_names, path)


# --- example predictions: plots/evaluate/examples.npz ----------------------------------------------------

EXAMPLE_KEYS = ("images", "masks", "preds", "names")


def write_examples(arrays: dict[str, np.ndarray], path: Path = EXAMPLES) -> None:
    """np.savez with fixed zip timestamps, so equal arrays give equal bytes."""
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w") as zf:
        for name in EXAMPLE_KEYS:
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(arrays[name]), allow_pickle=False)
            zf.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), buf.getvalue())


def read_examples(path: Path = EXAMPLES) -> dict[str, np.ndarray]:
    try:
        with np.load(path) as z:
            return {k: z[k] for k in EXAMPLE_KEYS}
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:  # missing, not an npz, corrupt, pickled
        reason = str(e).split(". ")[0]  # numpy's pickle message goes on to suggest loading it unsafely
        raise ArtifactError(f"{path}: not a readable examples archive ({reason}); run `dvc repro evaluate`") from None


# --- checkpoints and the resume state: models/*.pt --------------------------------------------------------

def read_torch(path: str | Path, what: str = "checkpoint") -> Any:
    """torch.load with weights_only: tensors and plain containers, never code."""
    path = Path(path)
    if path.is_dir():
        raise ArtifactError(f"{path}: is a folder, not a {what} file (e.g. {CHECKPOINTS['best']})")
    if not path.is_file():
        raise ArtifactError(f"{path}: {what} not found" + (" (run `dvc repro train`)" if what == "checkpoint" else ""))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ArtifactError(f"{path}: not a readable {what} ({load_error_reason(e)})") from None


def load_error_reason(e: Exception) -> str:
    """The informative line of a torch.load failure (its messages run to paragraphs)."""
    text = str(e).split("WeightsUnpickler error:")[-1]
    line = next((line.strip() for line in text.splitlines() if line.strip()), type(e).__name__)
    return line.split(". ")[0]
