"""params.yaml: the single source of configuration, validated on load.

Every stage calls `load_params()`; an unknown key, a wrong type or an out-of-range value
fails with a `ParamsError` naming the key. Numbers written as `5e-4` (a string to PyYAML)
are accepted as floats. Overrides (`key.path=value`) change a params mapping as `dvc exp run -S` does.
"""
from __future__ import annotations

import copy
import difflib
import re
import reprlib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from offroad.errors import PipelineError

PARAMS_FILE = Path("params.yaml")
PATCH = 14  # ViT patch size: image sides must be multiples of it
VIT_ARCHS = {"vits14": (384, 12, 6), "vitb14": (768, 12, 12), "vitl14": (1024, 24, 16)}  # embed dim, depth, heads
BACKBONES = tuple(f"dinov2_{arch}{reg}" for reg in ("", "_reg") for arch in VIT_ARCHS)


SHORT = reprlib.Repr()  # a YAML alias bomb shown in full is gigabytes
SHORT.maxlevel, SHORT.maxlist, SHORT.maxstring, SHORT.maxother = 2, 4, 60, 60


class ParamsError(PipelineError):
    pass


def _to_number(value: Any) -> Any:
    # YAML 1.1 reads `5e-4` as a string; bools are not numbers here.
    if isinstance(value, bool):
        raise ValueError("expected a number")
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ValueError("expected a number") from None
    return value


def Real(**bounds) -> Any:
    """A finite float within `bounds` (pydantic's ge/gt/le/lt); numbers written `5e-4` are accepted."""
    return Annotated[float, BeforeValidator(_to_number), Field(allow_inf_nan=False, **bounds)]


def Int(low: int, high: int) -> Any:
    """A whole number in low..high: every count has a ceiling, so a typo fails here, not as an allocation."""
    return Annotated[int, Field(ge=low, le=high, strict=True)]


Prob = Real(ge=0.0, le=1.0)
Seed = Int(0, 2**32 - 1)
Workers = Int(0, 256)  # 0 = all cores
Batch = Int(1, 4096)
MAX_SIDE = 4096  # of data.image_size


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ClassSpec(Section):
    name: str = Field(min_length=1, max_length=100)

    @field_validator("name")
    @classmethod
    def _one_line(cls, name: str) -> str:  # it heads table rows and CSV columns
        if any(ord(c) < 32 or ord(c) == 127 for c in name):
            raise ValueError("a class name is one line of printable characters (no newline, tab or control code)")
        return name
    raw: list[Annotated[int, Field(ge=0, le=65535, strict=True)]] = Field(min_length=1)


class Data(Section):
    root: str  # holds train/ and val/
    test_root: str  # holds Color_Images/ and Segmentation/ of the held-out test split
    image_size: tuple[Int(1, MAX_SIDE), Int(1, MAX_SIDE)]  # [width, height]
    ignore_index: Annotated[int, Field(ge=0, le=255, strict=True)]
    ignore_raw: list[Annotated[int, Field(ge=0, le=65535, strict=True)]] = []
    classes: list[ClassSpec] = Field(min_length=2)

    @model_validator(mode="after")
    def _check(self) -> "Data":
        w, h = self.image_size
        if w % PATCH or h % PATCH:
            raise ValueError(f"image_size {list(self.image_size)} must be multiples of {PATCH} (e.g. [476, 266])")
        names = [c.name for c in self.classes]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"classes: duplicate class names {dup}")
        ids = [i for c in self.classes for i in c.raw] + list(self.ignore_raw)
        dup_ids = sorted({i for i in ids if ids.count(i) > 1})
        if dup_ids:
            raise ValueError(f"classes: raw ids {dup_ids} are mapped more than once")
        if self.ignore_index < len(self.classes):
            raise ValueError(f"ignore_index {self.ignore_index} collides with a class index (0..{len(self.classes) - 1})")
        return self

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


class Synthetic(Section):
    seed: Seed
    train: Int(1, 100_000)
    val: Int(1, 100_000)
    test: Int(1, 100_000)
    width: Int(28, 7680) = 960  # smaller scenes cannot be drawn
    height: Int(28, 4320) = 540


class Prepare(Section):
    workers: Workers


class ClassWeights(Section):
    method: Literal["none", "inverse_frequency", "median_frequency"]
    max_weight: Real(gt=0.0, le=1e6)


class Model(Section):
    backbone: Literal[BACKBONES]  # type: ignore[valid-type]
    weights: str = Field(min_length=1)  # random | dinov2 | path to a checkpoint
    head: Literal["convnext", "multiscale"]
    head_channels: Int(1, 4096)
    layers: Int(1, 40)  # intermediate blocks fused by the multiscale head
    init_seed: Seed  # seed of the random backbone, so train and evaluate build the same one
    attention: Literal["auto", "sdpa", "matmul"]  # CPU bf16 attention kernel; auto: by the CPU's capabilities


class Optimizer(Section):
    name: Literal["sgd", "adamw"]
    lr: Real(gt=0.0, le=1.0)
    momentum: Real(ge=0.0, lt=1.0)
    weight_decay: Real(ge=0.0, le=10.0)


class Scheduler(Section):
    name: Literal["constant", "cosine"]
    min_lr: Real(ge=0.0, le=1.0)


class Loss(Section):
    name: Literal["cross_entropy", "focal_dice"]
    class_weighted: bool
    focal_gamma: Real(ge=0.0, le=10.0)
    focal_weight: Real(ge=0.0, le=100.0)
    dice_weight: Real(ge=0.0, le=100.0)


class Affine(Section):
    p: Prob
    shift: Real(ge=0.0, le=0.5)
    scale: Real(ge=0.0, lt=1.0)
    rotate: Real(ge=0.0, le=180.0)


class Blur(Section):
    p: Prob
    limit: Int(3, 99)


class ColorJitter(Section):
    p: Prob
    brightness: Real(ge=0.0, le=1.0)  # factors drawn from 1 +- this
    contrast: Real(ge=0.0, le=1.0)
    saturation: Real(ge=0.0, le=1.0)
    hue: Real(ge=0.0, le=0.5)


class Augment(Section):
    enabled: bool
    hflip: Prob
    vflip: Prob
    affine: Affine
    blur: Blur
    color_jitter: ColorJitter


class Train(Section):
    epochs: Int(1, 10_000)
    batch_size: Batch
    backbone_batch: Int(0, 4096)  # images per frozen-backbone forward, in whole train batches (0: one batch)
    seed: Seed
    device: str = Field(pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    num_workers: Workers
    amp: Literal["auto"] | bool  # auto: bf16 where the hardware runs it natively (offroad.runtime.choose_precision)
    amp_dtype: Literal["auto", "bf16", "fp16"]
    early_stopping_patience: Int(0, 10_000)  # 0 = off
    checkpoint: Literal["best", "final"]
    compile: bool
    processes: Int(1, 1024)  # per node; above 1 (or nodes above 1) stages.train launches DDP workers
    nodes: Int(1, 1024)  # machines joining one run through OFFROAD_RDZV_ENDPOINT (README "GPUs")


class Evaluate(Section):
    batch_size: Batch
    examples: Int(0, 64)  # test images kept for the predictions figure


class Plot(Section):
    dpi: Int(10, 600)


class Params(Section):
    data: Data
    synthetic: Synthetic
    prepare: Prepare
    class_weights: ClassWeights
    model: Model
    optimizer: Optimizer
    scheduler: Scheduler
    loss: Loss
    augment: Augment
    train: Train
    evaluate: Evaluate
    plot: Plot

    @model_validator(mode="after")
    def _check(self) -> "Params":
        if self.scheduler.name == "cosine" and self.scheduler.min_lr > self.optimizer.lr:
            raise ValueError(f"scheduler.min_lr {self.scheduler.min_lr} exceeds optimizer.lr {self.optimizer.lr}")
        return self


def _section_keys(loc: tuple) -> list[str]:
    model: Any = Params
    for part in loc[:-1]:
        if isinstance(part, str):
            ann = model.model_fields[part].annotation
            model = getattr(ann, "__args__", (ann,))[0]  # list[ClassSpec] -> ClassSpec
    return list(model.model_fields)


def _describe(err: dict) -> str:
    loc = tuple(err["loc"])
    key = ".".join(str(p) for p in loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        hint = difflib.get_close_matches(str(loc[-1]), _section_keys(loc), n=1)
        return f"unknown key '{key}'" + (f" (did you mean '{hint[0]}'?)" if hint else "")
    if err["type"] == "missing":
        return f"missing key '{key}'"
    msg = err["msg"].removeprefix("Value error, ")
    if not loc:
        return msg
    shown = "" if isinstance(err.get("input"), dict) else f" (got {SHORT.repr(err.get('input'))})"  # a section: too long
    return f"'{key}': {msg}{shown}"


def validate(raw: Any, source: str = "params") -> Params:
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of sections, got {type(raw).__name__}"
                          + (" (the file is empty)" if raw is None else ""))
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        lines = [_describe(err) for err in e.errors()]
        raise ParamsError(f"{source}: invalid params:\n  " + "\n  ".join(lines)) from None


MAX_PARAMS_BYTES = 1 << 20


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
        for i, key in enumerate(keys):
            if isinstance(key, str) and key in keys[:i]:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                        node.value[i][0].start_mark)
        return super().construct_mapping(node, deep)


def _load_unique(text: str) -> Any:
    loader = _UniqueKeyLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    path = Path(path)
    try:
        if path.exists() and not path.is_file():  # a folder, a FIFO, /dev/zero: never read
            raise ParamsError(f"{path}: not a regular file")
        with open(path, "rb") as f:
            data = f.read(MAX_PARAMS_BYTES + 1)
        if len(data) > MAX_PARAMS_BYTES:
            raise ParamsError(f"{path}: larger than {MAX_PARAMS_BYTES} bytes: not a params file")
        raw = _load_unique(data.decode())
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found (run stages from the repository root)") from None
    except (OSError, UnicodeDecodeError) as e:  # unreadable, not UTF-8 text
        raise ParamsError(f"{path}: cannot read it as text ({e})") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from None
    return validate(raw, str(path))


def parse_override(text: str) -> tuple[str, Any]:
    """`key.path=value`, as `dvc exp run -S` takes it, as (key.path, value): the value parsed as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not re.fullmatch(r"\+?\w+(\.\w+)*", key):
        raise ParamsError(f"not a `key.path=value` override: {text!r}")
    return key, yaml.safe_load(value)


def read_overrides(path: str | Path) -> dict[str, Any]:
    """An overrides file (experiments/*.args: one `-S key.path=value` per line, for `dvc exp run $(cat FILE)`)
    as {key.path: value}."""
    overrides = {}
    for line in filter(str.strip, Path(path).read_text().splitlines()):  # blank lines: none for the shell either
        if not re.fullmatch(r"-S \S+", line):
            raise ParamsError(f"{path}: not a `-S key=value` line: {line!r}")
        key, value = parse_override(line.removeprefix("-S "))
        overrides[key] = value
    return overrides


def apply_overrides(raw: dict, overrides: dict[str, Any], source: str = "params") -> dict:
    """A copy of the params mapping `raw` with each dotted key of `overrides` set to its value. As with
    `dvc exp run -S`, the key must be there already; `+key.path` adds one."""
    raw = copy.deepcopy(raw)
    for key, value in overrides.items():
        *parents, last = key.removeprefix("+").split(".")
        node = raw
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or (last not in node and not key.startswith("+")):
            raise ParamsError(f"no param {key} in {source}")
        node[last] = value
    return raw
