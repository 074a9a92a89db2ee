"""Bad input through the real stage commands, atomic outputs, safe loading and reproducibility.

Every case of the catalogue runs `python -m stages.NAME` in a copy of a tiny, fully built project and
asserts: exit status 1, one `error: ...` line naming the problem and no traceback, and every file
under data/, models/, metrics/ and plots/ byte-for-byte as it was, with no temporary left behind.
The validators themselves are tested function by function in test_params, test_dataset, test_model.
"""
from __future__ import annotations

import ast
import ctypes
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import pytest
import torch
import yaml

from offroad import artifacts, atomic
from offroad.config import load_params
from offroad.evaluation import Evaluation
from offroad.losses import build_loss
from offroad.runtime import Run
from offroad.segmenter import build_model
from offroad.training import Trainer, make_optimizer, train_epoch
from tests.conftest import REPO, REPO_FILES, TINY, run_dvc, with_overrides, write_params

# The whole pipeline in ~30 s: 6 + 3 synthetic scenes at 112x56, two epochs, a small head.
PIPELINE = {**TINY, "train.epochs": 2, "train.num_workers": 0, "train.device": "cpu", "model.head_channels": 16,
            "evaluate.examples": 2, "plot.dpi": 30}
OUTPUTS = ("data", "models", "metrics", "plots")
CLASSES = with_overrides()["data"]["classes"]
PR_CAPBSET_DROP = 24  # linux prctl option
ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "DVC_NO_ANALYTICS": "1"}


def new_project(dest: Path) -> Path:
    """The project's stages, dvc.yaml and DVC config in a fresh git repository, with PIPELINE params."""
    for name in REPO_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "-c", "commit.gpgsign=false"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "test copy"]):
        subprocess.run(git + args, cwd=dest, check=True, capture_output=True)
    write_params(dest / "params.yaml", PIPELINE)
    return dest


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A project copy after a full `dvc repro` with PIPELINE params (read-only: copy it to change it)."""
    repo = new_project(tmp_path_factory.mktemp("built"))
    run_dvc(repo, "repro")
    return repo


@pytest.fixture
def repo(built, tmp_path) -> Path:
    return Path(shutil.copytree(built, tmp_path / "repo", symlinks=True))


def run_stage(repo: Path, stage: str, env: dict | None = None, args: tuple = (),
              preexec: Callable | None = None) -> subprocess.CompletedProcess:
    """`python -m stages.STAGE` (or a dotted module such as offroad.predict) in `repo`."""
    module = stage if "." in stage else f"stages.{stage}"
    return subprocess.run([sys.executable, "-m", module, *args], cwd=repo, env={**ENV, **(env or {})},
                          capture_output=True, text=True, timeout=300, preexec_fn=preexec)


def snapshot(repo: Path) -> dict[str, bytes]:
    return {str(p.relative_to(repo)): p.read_bytes()
            for top in OUTPUTS for p in sorted((repo / top).rglob("*")) if p.is_file()}


def temporaries(repo: Path) -> list[str]:
    """What atomic writes leave behind when they are interrupted: .NAME.PID.tmp, .tmpdir, .old."""
    return [str(p.relative_to(repo)) for top in OUTPUTS for p in (repo / top).rglob(".*")
            if p.name.endswith((".tmp", ".tmpdir", ".old"))]


@dataclass
class Outcome:
    result: subprocess.CompletedProcess
    unchanged: bool  # every file under OUTPUTS as it was before the stage ran
    temporaries: list[str]


def attempt(repo: Path, stage: str, env: dict | None = None, args: tuple = (),
            preexec: Callable | None = None) -> Outcome:
    before = snapshot(repo)
    result = run_stage(repo, stage, env, args, preexec)
    return Outcome(result, snapshot(repo) == before, temporaries(repo))


def assert_refused(outcome: Outcome, *excerpts: str) -> str:
    """Exit 1, one `error:` line holding every excerpt, no traceback, nothing written; returns the message."""
    result = outcome.result
    assert result.returncode == 1, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    message = result.stderr[result.stderr.index("error: "):]
    for excerpt in excerpts:
        assert excerpt in message
    assert outcome.unchanged and outcome.temporaries == []
    return message


# --- the catalogue ----------------------------------------------------------------------------------------------

def params(overrides: dict):
    return lambda repo: write_params(repo / "params.yaml", {**PIPELINE, **overrides})


def renamed(index: int, name: str) -> list[dict]:
    return [{**c, "name": name} if i == index else c for i, c in enumerate(CLASSES)]


def scene(repo: Path, folder: str, index: int, split: str = "train") -> Path:
    return repo / "data/synthetic" / split / folder / f"{split}_{index:05d}.png"


def file_replaced_by_folder(name: str):
    def break_it(repo: Path) -> None:
        (repo / name).unlink()
        (repo / name / "x").mkdir(parents=True)
    return break_it


def both(*breaks: Callable[[Path], None]):
    return lambda repo: [b(repo) for b in breaks]


def scene_of(folder: str, index: int, split: str) -> Callable[[Path], Path]:
    return lambda repo: scene(repo, folder, index, split)


def cropped(where: Callable[[Path], Path]):
    def break_it(repo: Path) -> None:
        path = where(repo)
        pixels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        cv2.imwrite(str(path), pixels[: pixels.shape[0] // 2, : pixels.shape[1] // 2])
    return break_it


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def write_mask(path: Path, mask: np.ndarray) -> None:
    assert cv2.imwrite(str(path), mask)


def with_raw_id(path: Path, raw_id: int) -> None:
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    mask[:5, :7] = raw_id
    write_mask(path, mask)


def weights_file(state) -> Callable[[Path], None]:
    def break_it(repo: Path) -> None:
        (repo / "weights").mkdir()
        torch.save(state, repo / "weights/backbone.pth")
        write_params(repo / "params.yaml", {**PIPELINE, "model.weights": "weights/backbone.pth"})
    return break_it


def absurd_class_weights(repo: Path) -> None:
    path = repo / "data/class_weights.json"
    data = json.loads(path.read_text())
    data["weights"] = {name: 3e38 for name in data["weights"]}  # finite, but their sum over pixels is inf
    path.write_text(json.dumps(data))


def rewrite(relpath: str, content: bytes):
    return lambda repo: (repo / relpath).write_bytes(content)


def cut(relpath: str):
    return lambda repo: truncate(repo / relpath)


def edit_array(relpath: str, change: Callable[[np.ndarray], None]):
    """Change a prepared .npy array in place (as a hand edit or other code would)."""
    def break_it(repo: Path) -> None:
        array = np.load(repo / relpath, mmap_mode="r+")
        change(array)
        array.flush()
    return break_it


def set_all(value: int):
    def change(array: np.ndarray) -> None:
        array[:] = value
    return change


def edit_json(relpath: str, change: Callable[[dict], None]):
    def break_it(repo: Path) -> None:
        data = json.loads((repo / relpath).read_text())
        change(data)
        (repo / relpath).write_text(json.dumps(data))
    return break_it


def non_utf8_name(workers: int):
    """Scene 1 of train, image and mask, renamed to a name with a byte that is not UTF-8; prepare.workers set."""
    def break_it(repo: Path) -> None:
        for folder in ("Color_Images", "Segmentation"):
            src = scene(repo, folder, 1)
            os.rename(src, os.fsencode(src.parent) + b"/train_\xff.png")
        write_params(repo / "params.yaml", {**PIPELINE, "prepare.workers": workers})
    return break_it


def val_all_ignored(repo: Path) -> None:
    """The issue's example: every val pixel is a raw id in data.ignore_raw, prepared by the prepare stage."""
    for path in (repo / "data/synthetic/val/Segmentation").glob("*.png"):
        write_mask(path, np.full((126, 224), 600, np.uint16))
    classes = [{**c, "raw": [0]} if c["name"] == "Background" else c for c in CLASSES]
    write_params(repo / "params.yaml", {**PIPELINE, "data.classes": classes, "data.ignore_raw": [600]})
    assert run_stage(repo, "prepare").returncode == 0


def without_section(name: str):
    def break_it(repo: Path) -> None:
        raw = with_overrides(PIPELINE)
        del raw[name]
        (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return break_it


def tampered_head(repo: Path) -> None:
    ckpt = torch.load(repo / "models/best.pt", weights_only=True)
    ckpt["head"].pop(next(iter(ckpt["head"])))
    torch.save(ckpt, repo / "models/best.pt")


def folder_replaced_by_file(folder: str):
    def break_it(repo: Path) -> None:
        shutil.rmtree(repo / folder)
        (repo / folder).write_text("not a folder")
    return break_it


CATALOGUE = {
    # params.yaml (every stage validates the whole file before it reads anything else)
    "params: unknown key": ("train", params({"+optimizer.lrr": 1e-3}),
                            ["params.yaml: invalid params", "unknown key 'optimizer.lrr' (did you mean 'lr'?)"]),
    "params: wrong type": ("evaluate", params({"train.epochs": "ten"}),
                           ["'train.epochs': Input should be a valid integer (got 'ten')"]),
    "params: out-of-range lr, epochs, batch size, patience": (
        "train", params({"optimizer.lr": 2.0, "train.epochs": 0, "train.batch_size": 0,
                         "train.early_stopping_patience": -1}),
        ["'optimizer.lr': Input should be less than or equal to 1 (got 2.0)",
         "'train.epochs': Input should be greater than or equal to 1 (got 0)",
         "'train.batch_size': Input should be greater than or equal to 1 (got 0)",
         "'train.early_stopping_patience': Input should be greater than or equal to 0 (got -1)"]),
    "params: image size not a multiple of 14": ("prepare", params({"data.image_size": [120, 56]}),
                                                ["image_size [120, 56] must be multiples of 14"]),
    "params: duplicate class names": ("class_weights", params({"data.classes": renamed(1, "Background")}),
                                      ["duplicate class names ['Background']"]),
    "params: duplicate raw ids": ("prepare", params({"data.ignore_raw": [600]}),
                                  ["raw ids [600] are mapped more than once"]),
    "params: empty class list": ("plot", params({"data.classes": []}),
                                 ["'data.classes': List should have at least 2 items"]),
    "params: not YAML": ("synthesize", rewrite("params.yaml", b"data: [476, 266\n"),
                         ["params.yaml: not valid YAML"]),
    "params: not UTF-8 text": ("synthesize", rewrite("params.yaml", "data: 1\n".encode("utf-16")),
                               ["params.yaml: cannot read it as text", "codec can't decode"]),
    # data.root, through prepare
    "data: missing root": ("prepare", params({"data.root": "data/nowhere"}),
                           ["data root data/nowhere does not exist (data.root in params.yaml)"]),
    "data: empty split": ("prepare", lambda r: [p.unlink() for p in (r / "data/synthetic/val").rglob("*.png")],
                          ["data/synthetic/val: no PNG files in Color_Images/"]),
    "data: image without mask": ("prepare", lambda r: scene(r, "Segmentation", 2).unlink(),
                                 ["1 file(s) in Color_Images/ have no partner in Segmentation/: train_00002.png"]),
    "data: mask without image": ("prepare", lambda r: scene(r, "Color_Images", 3).unlink(),
                                 ["1 file(s) in Segmentation/ have no partner in Color_Images/: train_00003.png"]),
    "data: truncated image": ("prepare", lambda r: truncate(scene(r, "Color_Images", 1)),
                              ["Color_Images/train_00001.png: cannot decode image"]),
    "data: corrupt mask": ("prepare", lambda r: scene(r, "Segmentation", 4).write_bytes(b"\x89PNG\r\n\x1a\nnot"),
                           ["Segmentation/train_00004.png: cannot decode mask"]),
    "data: 8-bit mask": ("prepare", lambda r: write_mask(scene(r, "Segmentation", 0), np.zeros((126, 224), np.uint8)),
                         ["train_00000.png: mask is 8-bit with 1 channel(s); expected a 16-bit single-channel PNG"]),
    "data: RGB mask": ("prepare", lambda r: write_mask(scene(r, "Segmentation", 5), np.zeros((126, 224, 3), np.uint8)),
                       ["train_00005.png: mask is 8-bit with 3 channel(s)"]),
    "data: unknown raw id": ("prepare", lambda r: with_raw_id(scene(r, "Segmentation", 2, "val"), 4321),
                             ["val/Segmentation/val_00002.png: raw ids [4321] are not in data.classes"]),
    "data: image and mask sizes differ": (
        "prepare", lambda r: write_mask(scene(r, "Segmentation", 1), np.zeros((63, 112), np.uint16)),
        ["train_00001.png: mask is 112x63 but its image is 224x126"]),
    # model.weights, through train
    "weights: no such file": ("train", params({"model.weights": "weights/nope.pth"}),
                              ["model.weights: weights/nope.pth does not exist"]),
    "weights: not a checkpoint": ("train", params({"model.weights": "data/synthetic/val/Color_Images/val_00000.png"}),
                                  ["val_00000.png: not a weights-only torch checkpoint"]),
    "weights: a pickled module": ("train", weights_file(torch.nn.Linear(2, 2)),
                                  ["weights/backbone.pth: not a weights-only torch checkpoint (Unsupported global"]),
    "weights: missing, unexpected and misshapen keys": (
        "train", weights_file({"cls_token": torch.zeros(1, 1, 768), "head.weight": torch.zeros(3)}),
        ["weights/backbone.pth does not fit dinov2_vits14", "missing keys: pos_embed, mask_token",
         "unexpected keys: head.weight", "wrong shapes: cls_token [1, 1, 768] != [1, 1, 384]"]),
    # the kept checkpoint, through evaluate
    "checkpoint: missing": ("evaluate", lambda r: (r / "models/best.pt").unlink(),
                            ["models/best.pt: checkpoint not found (run `dvc repro train`)"]),
    "checkpoint: other class list": ("evaluate", params({"data.classes": renamed(9, "Heaven")}),
                                     ["models/best.pt: trained for classes ['Background'", "'Sky']",
                                      "params.yaml has ['Background'", "'Heaven']"]),
    "checkpoint: other backbone": ("evaluate", params({"model.backbone": "dinov2_vits14_reg"}),
                                   ["models/best.pt was trained with a different model (model.backbone: checkpoint "
                                    "'dinov2_vits14', params.yaml 'dinov2_vits14_reg')"]),
    "checkpoint: truncated": ("evaluate", cut("models/best.pt"),
                              ["models/best.pt: not a readable checkpoint"]),
    # training and plotting
    "train: loss becomes NaN": ("train", absurd_class_weights,
                                ["loss is nan at epoch 1, batch 1; stopped, no epoch had completed, nothing was "
                                 "saved", "Try a lower optimizer.lr, or check data/class_weights.json"]),
    "plot: examples archive corrupt": ("plot", cut("plots/evaluate/examples.npz"),
                                       ["plots/evaluate/examples.npz: not a readable examples archive"]),
    "plot: class stats not JSON": ("plot", rewrite("metrics/class_stats.json", b"{"),
                                   ["metrics/class_stats.json: not valid JSON"]),
    # --- issue #15: an adversarial sweep ---
    # stale or damaged prepared arrays (the train and evaluate stages run directly, without dvc)
    "prepared: image size changed since prepare": (
        "train", params({"data.image_size": [140, 56]}),
        ["data/prepared/train: prepared with other data params (data.image_size differ from params.yaml); "
         "run `dvc repro prepare`"]),
    "prepared: ignore_raw changed since prepare": (
        "evaluate", params({"data.ignore_raw": [4321]}),
        ["data/prepared/test: prepared with other data params (data.ignore_raw differ"]),
    "prepared: val split has no labelled pixel": (
        "train", val_all_ignored,
        ["data/prepared/val: no labelled pixel in the masks (all are data.ignore_index: raw ids in data.ignore_raw), "
         "so there is nothing to choose the best epoch by"]),
    "prepared: train split has no labelled pixel": (
        "class_weights", edit_array("data/prepared/train/masks.npy", set_all(255)),
        ["data/prepared/train: no labelled pixel in the masks", "there are no class frequencies to weigh by"]),
    "prepared: mask values beyond the classes": (
        "train", edit_array("data/prepared/train/masks.npy", lambda a: a.__setitem__((2, 0, slice(0, 3)), 77)),
        ["data/prepared/train: masks hold values [77] that are neither a class index (0..9) nor data.ignore_index "
         "255"]),
    "prepared: names not a list": ("evaluate", edit_json("data/prepared/val/split.json",
                                                         lambda d: d.__setitem__("names", 3)),
                                   ["data/prepared/val/split.json: 'names' is not a list of file names"]),
    "prepared: images not uint8": (
        "evaluate", lambda r: np.save(r / "data/prepared/val/images.npy", np.zeros((3, 56, 112, 3), np.float32)),
        ["data/prepared/val: images float32 [3, 56, 112, 3] and masks uint8 [3, 56, 112] are not uint8"]),
    "prepared: masks truncated": ("evaluate", cut("data/prepared/val/masks.npy"),
                                  ["data/prepared/val: prepared split missing or unreadable"]),
    "prepared: split deleted": ("evaluate", lambda r: shutil.rmtree(r / "data/prepared/val"),
                                ["data/prepared/val: prepared split missing or unreadable",
                                 "run `dvc repro prepare`"]),
    # raw data
    "data: empty image file": ("prepare", lambda r: scene(r, "Color_Images", 1).write_bytes(b""),
                               ["Color_Images/train_00001.png: cannot decode image (missing, empty"]),
    "data: empty mask file": ("prepare", lambda r: scene(r, "Segmentation", 2, "val").write_bytes(b""),
                              ["val/Segmentation/val_00002.png: cannot decode mask (missing, empty"]),
    "data: file name not UTF-8, one process": ("prepare", non_utf8_name(1),
                                               ["data/synthetic/train/Color_Images: 1 file name(s) are not valid "
                                                "UTF-8: train_\\xff.png; rename them"]),
    "data: file name not UTF-8, process pool": ("prepare", non_utf8_name(2),
                                                ["1 file name(s) are not valid UTF-8: train_\\xff.png"]),
    # params
    "params: empty file": ("synthesize", rewrite("params.yaml", b""),
                           ["params.yaml: expected a mapping of sections, got NoneType (the file is empty)"]),
    "params: a folder": ("prepare", lambda r: ((r / "params.yaml").unlink(), (r / "params.yaml").mkdir()),
                         ["params.yaml: not a regular file"]),
    "params: missing section": ("class_weights", without_section("plot"), ["missing key 'plot'"]),
    "params: image size with three numbers": ("prepare", params({"data.image_size": [112, 56, 3]}),
                                              ["'data.image_size': Tuple should have at most 2 items"]),
    "params: ignore_index is a class index": ("prepare", params({"data.ignore_index": 3}),
                                              ["'data': ignore_index 3 collides with a class index (0..9)\n"]),
    "params: min_lr above lr": ("train", params({"scheduler.min_lr": 0.1}),
                                ["scheduler.min_lr 0.1 exceeds optimizer.lr 0.0005"]),
    "params: device name": ("evaluate", params({"train.device": "gpu"}),
                            ["'train.device': String should match pattern", "(got 'gpu')"]),
    "params: synthetic scenes too small to draw": (
        "synthesize", params({"synthetic.width": 8}),
        ["'synthetic.width': Input should be greater than or equal to 28 (got 8)"]),
    "params: more head layers than blocks": ("train", params({"model.head": "multiscale", "model.layers": 13}),
                                             ["model.layers 13 exceeds the 12 blocks of dinov2_vits14"]),
    # class weights, through train
    "class weights: missing": ("train", lambda r: (r / "data/class_weights.json").unlink(),
                               ["data/class_weights.json: not found (run `dvc repro`)"]),
    "class weights: negative": ("train", edit_json("data/class_weights.json",
                                                   lambda d: d["weights"].__setitem__("Sky", -1.0)),
                                ["data/class_weights.json: 'weights' lacks a finite non-negative number for ['Sky']"]),
    "class weights: other classes": ("train", edit_json("data/class_weights.json",
                                                        lambda d: d.__setitem__("classes", d["classes"][:-1])),
                                     ["data/class_weights.json: classes ['Background'", "differ from params.yaml"]),
    # checkpoints, through evaluate
    "checkpoint: other head width": ("evaluate", params({"model.head_channels": 32}),
                                     ["model.head_channels: checkpoint 16, params.yaml 32"]),
    "checkpoint: other random backbone seed": ("evaluate", params({"model.init_seed": 1}),
                                               ["model.init_seed: checkpoint 0, params.yaml 1"]),
    "checkpoint: not a head checkpoint": ("evaluate", lambda r: torch.save([1, 2], r / "models/best.pt"),
                                          ["models/best.pt: not a head checkpoint"]),
    "checkpoint: head weights tampered": ("evaluate", tampered_head,
                                          ["models/best.pt: head weights do not fit (Error(s) in loading"]),
    # evaluation tables, through plot
    "history: missing columns": ("plot", rewrite("dvclive/plots/metrics/train/loss.tsv", b"step\n1\n"),
                                 ["dvclive/plots/metrics: bad column or value ('loss') in DVCLive's series"]),
    "history: no epochs": ("plot", rewrite("dvclive/plots/metrics/train/loss.tsv", b"step\tloss\n"),
                           ["dvclive/plots/metrics: no epochs"]),
    "history: an interrupted log": ("plot", rewrite("dvclive/plots/metrics/lr.tsv", b"step\tlr\n1\t0.0005\n"),
                                    ["dvclive/plots/metrics: the series cover different epochs"]),
    "confusion: not square": ("plot", rewrite("plots/evaluate/confusion.csv", b"truth/prediction,a\nb,1,2\n"),
                              ["plots/evaluate/confusion.csv: not found, or not a square matrix"]),
    "per-class table: missing columns": ("plot", rewrite("plots/evaluate/per_class.csv", b"class,iou\nSky,0.5\n"),
                                         ["plots/evaluate/per_class.csv: missing columns ['dice'"]),
    # outputs that could not be written: refused at start-up, before any work
    "outputs: metrics is a file": ("train", folder_replaced_by_file("metrics"),
                                   ["metrics/run/train.json: cannot write (metrics is not a folder)"]),
    "outputs: plots/images is below a file": ("plot", folder_replaced_by_file("plots"),
                                              ["plots/images: cannot write (plots is not a folder)"]),
    "outputs: a checkpoint's path is a folder": ("train", file_replaced_by_folder("models/final.pt"),
                                                 ["models/final.pt: cannot write (it is a folder; remove it)"]),
    "data: the test split is the val folder": ("prepare", params({"data.test_root": "data/synthetic/val"}),
                                               ["the val and test splits are the same folder (data/synthetic/val)"]),
    # a split that fails after others were prepared: all three are kept as they were
    "data: new image size, then a bad mask in the last split": (
        "prepare", both(params({"data.image_size": [56, 28]}), cropped(scene_of("Segmentation", 2, "test"))),
        ["test_00002.png: mask is 112x63 but its image is 224x126"]),
}


@pytest.fixture(scope="module")
def outcomes(built, tmp_path_factory) -> dict[str, Outcome]:
    """Every catalogue case in its own broken copy of `built`, the stages run side by side (a failing stage
    spends its second or two importing torch)."""
    repos = {}
    for case, (_, break_it, _) in CATALOGUE.items():
        repos[case] = Path(shutil.copytree(built, tmp_path_factory.mktemp("case") / "repo", symlinks=True))
        break_it(repos[case])
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        return dict(zip(CATALOGUE, pool.map(lambda case: attempt(repos[case], CATALOGUE[case][0]), CATALOGUE)))


@pytest.mark.parametrize("case", CATALOGUE)
def test_bad_input_is_refused_and_changes_nothing(outcomes, case):
    assert_refused(outcomes[case], *CATALOGUE[case][2])


def test_dinov2_offline_names_the_url_and_where_to_put_the_file(repo, tmp_path):
    hub = tmp_path / "torch_home"
    offline = {"TORCH_HOME": str(hub), "https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
               "no_proxy": "", "NO_PROXY": ""}  # a closed local port: the download fails at once, never runs
    params({"model.weights": "dinov2"})(repo)
    outcome = attempt(repo, "train", env=offline)
    message = assert_refused(outcome)
    assert ("warning: model.weights is 'dinov2' but data.root is the synthetic desert (data/synthetic)"
            in outcome.result.stderr)  # a likely mistake, named before the error
    assert "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth" in message
    assert f"download that file and place it at {hub}/hub/checkpoints/dinov2_vits14_pretrain.pth" in message
    assert "Connection refused" in message  # it went to the dead proxy, not to the internet
    assert [p for p in hub.rglob("*") if p.is_file()] == []  # no partial download left


class Payload:
    """Pickles to `open(marker, "w")`: unpickling it creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_malicious_checkpoint_is_refused_without_running_it(repo, tmp_path):
    evil = {"head": Payload(tmp_path / "pwned"), "params": {}, "class_names": []}
    torch.save(evil, repo / "models/best.pt")
    torch.save({"head": Payload(tmp_path / "armed")}, tmp_path / "armed.pt")
    torch.load(tmp_path / "armed.pt", weights_only=False)  # the payload is live when loaded unsafely
    assert (tmp_path / "armed").exists()
    assert_refused(attempt(repo, "evaluate"), "models/best.pt: not a readable checkpoint (Unsupported global")
    assert not (tmp_path / "pwned").exists()


def test_stray_files_in_the_data_are_ignored_with_a_warning(repo):
    (repo / "data/synthetic/train/Color_Images/notes.txt").write_text("hello")
    (repo / "data/synthetic/val/Segmentation/Thumbs.db").write_bytes(b"\0")
    before = {k: v for k, v in snapshot(repo).items() if k.startswith("data/prepared")}
    result = run_stage(repo, "prepare")
    assert result.returncode == 0, result.stderr
    assert "warning: ignoring 1 non-PNG file(s) in data/synthetic/train/Color_Images: notes.txt" in result.stderr
    assert "warning: ignoring 1 non-PNG file(s) in data/synthetic/val/Segmentation: Thumbs.db" in result.stderr
    assert {k: v for k, v in snapshot(repo).items() if k.startswith("data/prepared")} == before


def test_numbers_written_like_5e_4_are_read_as_numbers(repo):
    text = (repo / "params.yaml").read_text()
    assert "  lr: 0.0005\n" in text
    (repo / "params.yaml").write_text(text.replace("  lr: 0.0005\n", "  lr: 5e-4\n"))  # a string to PyYAML
    before = snapshot(repo)
    result = run_stage(repo, "class_weights")
    assert result.returncode == 0, result.stderr
    assert snapshot(repo) == before


# --- atomic writes ----------------------------------------------------------------------------------------------

def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_temporaries_of_killed_writers_are_removed_and_a_live_writers_kept(tmp_path):
    dead, alive = dead_pid(), os.getppid()
    for pid in (dead, alive):
        (tmp_path / f".x.json.{pid}.tmp").write_text("half")
        (tmp_path / f".out.{pid}.tmpdir").mkdir()
        (tmp_path / f".out.{pid}.old").mkdir()
    (tmp_path / f".y.json.{dead}.tmp").write_text("another file's")
    atomic.write_json(tmp_path / "x.json", {"a": 1})
    with atomic.atomic_dir(tmp_path / "out") as tmp:
        (tmp / "f").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([
        "x.json", "out", f".x.json.{alive}.tmp", f".out.{alive}.tmpdir", f".out.{alive}.old", f".y.json.{dead}.tmp"])
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 1}
    assert (tmp_path / "out/f").read_text() == "new"


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    atomic.write_text(tmp_path / "a.txt", "old")
    with pytest.raises(ZeroDivisionError), atomic.atomic_path(tmp_path / "a.txt") as tmp:
        tmp.write_text("half")
        1 / 0
    with pytest.raises(ZeroDivisionError), atomic.atomic_dir(tmp_path / "d") as tmp:
        (tmp / "f").write_text("half")
        1 / 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
    assert (tmp_path / "a.txt").read_text() == "old"


def test_together_replaces_folders_and_files_as_one_set(tmp_path):
    def state():  # the visible files; the temporaries are hidden
        files = [p.relative_to(tmp_path) for p in sorted(tmp_path.rglob("*")) if p.is_file()]
        return {str(f): (tmp_path / f).read_text() for f in files if not any(n.startswith(".") for n in f.parts)}

    atomic.write_text(tmp_path / "a.txt", "old")
    with atomic.atomic_dir(tmp_path / "d") as tmp:
        (tmp / "f").write_text("old")
    with pytest.raises(ZeroDivisionError), atomic.together():
        with atomic.atomic_dir(tmp_path / "d") as tmp:
            (tmp / "f").write_text("new")
        atomic.write_text(tmp_path / "a.txt", "new")
        1 / 0
    assert state() == {"a.txt": "old", "d/f": "old"} and not list(tmp_path.rglob(".*"))
    with atomic.together():
        with atomic.atomic_dir(tmp_path / "d") as tmp:
            atomic.write_text(tmp / "f", "new")  # a file of the folder: held too, swapped in first
        atomic.write_text(tmp_path / "a.txt", "new")
        assert state() == {"a.txt": "old", "d/f": "old"}
    assert state() == {"a.txt": "new", "d/f": "new"}
    atomic.write_text(tmp_path / "e", "a file")
    with atomic.atomic_dir(tmp_path / "e") as tmp:  # a folder in place of a file leaves no .old behind
        (tmp / "f").write_text("x")
    assert state() == {"a.txt": "new", "d/f": "new", "e/f": "x"}
    assert not list(tmp_path.rglob(".*"))


def test_save_torch_gives_the_same_bytes_wherever_and_whoever_writes(tmp_path):
    obj = {"head": {"w": torch.arange(6.0).view(2, 3)}, "epoch": 3}
    atomic.save_torch(tmp_path / "a.pt", obj)
    code = ("import sys, torch; from offroad import atomic; "
            "atomic.save_torch(sys.argv[1], {'head': {'w': torch.arange(6.0).view(2, 3)}, 'epoch': 3})")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "sub/b.pt")], cwd=REPO, check=True)
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "sub/b.pt").read_bytes()
    assert torch.equal(torch.load(tmp_path / "a.pt", weights_only=True)["head"]["w"], obj["head"]["w"])


# --- safe loading -----------------------------------------------------------------------------------------------

def calls(tree: ast.AST, module: str, names: set[str]) -> list[ast.Call]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name) and node.func.value.id == module and node.func.attr in names]


def keyword(call: ast.Call, name: str):
    return next((k.value.value for k in call.keywords if k.arg == name and isinstance(k.value, ast.Constant)), None)


def test_stages_load_checkpoints_weights_only_and_yaml_safely():
    trees = {p.name: ast.parse(p.read_text()) for p in sorted([*(REPO / "stages").glob("*.py"),
                                                                *(REPO / "offroad").glob("*.py")])}
    torch_loads = {name: calls(tree, "torch", {"load"}) for name, tree in trees.items()}
    assert sum(map(len, torch_loads.values())) >= 2  # backbone weights; checkpoints and resume state
    assert {name: [keyword(c, "weights_only") for c in found] for name, found in torch_loads.items() if found} == \
        {name: [True] * len(found) for name, found in torch_loads.items() if found}
    assert [name for name, tree in trees.items() if calls(tree, "yaml", {"safe_load"})] == \
        ["config.py", "errors.py", "evidence.py", "guard.py"]
    assert {name: len(calls(tree, "yaml", {"load", "load_all", "full_load", "unsafe_load"}))
            for name, tree in trees.items()} == dict.fromkeys(trees, 0)
    assert not [name for name, tree in trees.items() for node in ast.walk(tree)
                if isinstance(node, (ast.Import, ast.ImportFrom)) and "pickle" in ast.unparse(node)]
    assert not [name for name, tree in trees.items() for c in calls(tree, "np", {"load"})
                if keyword(c, "allow_pickle") is True]


# --- reproducibility --------------------------------------------------------------------------------------------

def test_two_dvc_repro_runs_give_identical_outputs(built, tmp_path):
    again = new_project(tmp_path / "again")
    run_dvc(again, "repro")
    first, second = snapshot(built), snapshot(again)
    assert first.keys() == second.keys()
    assert len([k for k in first if k.startswith("plots/images/")]) == 6
    # how long training took is the one thing that differs, and it is kept apart from the metrics
    ran = [json.loads(s.pop("metrics/run/train.json")) for s in (first, second)]
    timings = {"train_seconds", "images_per_second", "backbone_seconds_saved"}
    assert ran[0].keys() == ran[1].keys() >= timings
    assert {k: v for k, v in ran[0].items() if k not in timings} == {k: v for k, v in ran[1].items() if k not in timings}
    different = sorted(k for k in first if first[k] != second[k])
    assert different == []  # data, class weights, checkpoints, metrics, history, evaluation, PNGs


# --- issue #15: interrupts, operating-system errors, names, warnings ---------------------------------------------

def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:  # a thread that ended meanwhile
            pass
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def many_scenes(repo: Path, copies: int) -> None:
    """`copies` hard links of every train pair under new names: a split that takes seconds to prepare."""
    for folder in ("Color_Images", "Segmentation"):
        for src in sorted((repo / "data/synthetic/train" / folder).glob("*.png")):
            for k in range(copies):
                os.link(src, src.with_name(f"copy{k:04d}_{src.name}"))


@pytest.mark.parametrize("stage, signum, to_group", [
    ("prepare", signal.SIGTERM, False),
    # once in ~4 full runs the stage hung after Ctrl-C to the group (not reproduced in 60 runs alone or under
    # load; a hang fails with the threads' stacks)
    pytest.param("prepare", signal.SIGINT, True, marks=pytest.mark.xfail(reason="intermittent hang", strict=False)),
    ("synthesize", signal.SIGTERM, False)])
def test_an_interrupted_stage_ends_its_workers_and_keeps_the_outputs(repo, stage, signum, to_group):
    """SIGTERM to the stage, or Ctrl-C (SIGINT to the whole process group), while its process pool works."""
    if stage == "prepare":
        many_scenes(repo, 150)
        write_params(repo / "params.yaml", {**PIPELINE, "prepare.workers": 2})
    else:
        write_params(repo / "params.yaml", {**PIPELINE, "synthetic.train": 2000})
    before = snapshot(repo)
    process = subprocess.Popen([sys.executable, "-m", f"stages.{stage}"], cwd=repo, text=True,
                               env={**ENV, "PYTHONFAULTHANDLER": "1"},  # SIGABRT dumps every thread's stack
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    workers = []
    try:
        deadline = time.monotonic() + 60
        while len(workers) < 2 and process.poll() is None and time.monotonic() < deadline:
            workers = children(process.pid)
            time.sleep(0.005)
        assert len(workers) == 2, process.communicate()
        for pid in workers:  # hold the pool mid-work, so the signal surely lands while it runs
            os.kill(pid, signal.SIGSTOP)
        os.killpg(process.pid, signum) if to_group else process.send_signal(signum)
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
        try:
            out, err = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            if process.poll() is not None:
                pytest.fail(f"{stage} exited ({process.returncode}) but its pipes stay open 60 s later; workers "
                            f"alive: {[pid for pid in workers if alive(pid)]}")
            process.send_signal(signal.SIGABRT)
            pytest.fail(f"{stage} still runs 60 s after {signal.Signals(signum).name}; where its threads were:\n"
                        f"{process.communicate(timeout=30)[1][-4000:]}")
        deadline = time.monotonic() + 10
        while any(map(alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(map(alive, workers))
    finally:
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signum, err
    assert "Traceback" not in err and "error" not in err, err
    assert err.splitlines()[-1] == (f"interrupted by {signal.Signals(signum).name}: nothing half-written was kept "
                                    "and the earlier outputs are as they were; `dvc repro` resumes")
    assert snapshot(repo) == before and temporaries(repo) == []


def test_ctrl_c_in_train_keeps_the_completed_epochs_and_a_rerun_resumes(repo):
    write_params(repo / "params.yaml", {**PIPELINE, "train.epochs": 6})
    before = snapshot(repo)
    process = subprocess.Popen([sys.executable, "-m", "stages.train"], cwd=repo, env={**ENV, "PYTHONUNBUFFERED": "1"},
                               text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("epoch   1/6"):
            os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
            break
    lines += process.stdout.readlines()
    process.wait()
    log = "".join(lines)
    assert process.returncode == 130, log
    assert "Traceback" not in log
    assert lines[-1] == ("interrupted by SIGINT: the state after the last completed epoch (if any) is kept in "
                         "models/last.pt; `dvc repro` resumes\n")
    after = snapshot(repo)
    kept = lambda files: {k: v for k, v in files.items()  # noqa: E731 (DVCLive's log shows the run that was stopped)
                          if k != "models/last.pt" and not k.startswith("dvclive/")}
    assert kept(after) == kept(before)
    saved = torch.load(repo / "models/last.pt", weights_only=True)["epoch"]
    assert 1 <= saved < 6 and temporaries(repo) == []
    rerun = run_stage(repo, "train")
    assert rerun.returncode == 0, rerun.stderr
    assert f"resume: continuing after epoch {saved}" in rerun.stdout


def without_root_privileges() -> None:
    """Drop the capabilities that let root ignore file permissions (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH)
    from the bounding set: the program exec'ed next runs as root, but a read-only folder is read-only to it."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0):
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@pytest.mark.parametrize("folder, output", [("models", "models/best.pt"), ("metrics/run", "metrics/run/train.json"),
                                            ("dvclive", "dvclive/metrics.json")])
def test_a_read_only_output_folder_is_refused_before_the_first_epoch(repo, folder, output):
    os.chmod(repo / folder, 0o555)
    try:
        outcome = attempt(repo, "train", preexec=without_root_privileges if os.geteuid() == 0 else None)
    finally:
        os.chmod(repo / folder, 0o755)
    assert_refused(outcome, f"{output}: cannot write ({folder}/ is not writable)")
    assert "epoch" not in outcome.result.stdout


def file_size_limit(size: int) -> Callable[[], None]:
    """A disk that fills up: writes beyond `size` bytes fail with EFBIG (SIGXFSZ ignored, so it is an OSError)."""
    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    return preexec


@pytest.mark.parametrize("stage, size, message", [
    ("prepare", 100_000, "data/prepared/train: cannot write (File too large)"),
    ("train", 20_000, "dvclive: cannot start DVCLive's log (DVC's state database: disk I/O error)"),
])
def test_a_full_disk_is_one_line_naming_the_file(repo, stage, size, message):
    if stage == "train":
        write_params(repo / "params.yaml", {**PIPELINE, "train.epochs": 3})  # a fresh run, not the finished one
    assert_refused(attempt(repo, stage, preexec=file_size_limit(size)), message)


def test_a_batch_without_labelled_pixels_is_skipped_not_called_divergence(repo):
    masks = np.load(repo / "data/prepared/train/masks.npy", mmap_mode="r+")
    masks[4] = 255  # one image without a labelled pixel: alone in its batch of one
    masks.flush()
    write_params(repo / "params.yaml", {**PIPELINE, "train.batch_size": 1})
    result = run_stage(repo, "train")
    assert result.returncode == 0, result.stderr
    history = (repo / "dvclive/plots/metrics/train/loss.tsv").read_text().splitlines()
    assert len(history) == 3 and "nan" not in "".join(history)


def test_a_batch_without_labelled_pixels_changes_nothing(tiny_params):
    params = tiny_params.model_copy(update={"model": tiny_params.model.model_copy(update={"head_channels": 16})})
    K = params.data.num_classes
    torch.manual_seed(1)
    feats = torch.randn(1, 384, 4, 8)
    labelled = torch.randint(0, K, (1, 56, 112))
    unlabelled = torch.full_like(labelled, 255)

    def one_epoch(inputs: list) -> tuple[dict, Evaluation]:
        torch.manual_seed(0)
        model = build_model(params.model, K)
        optimizer = make_optimizer(params, model.head.parameters())
        weights = torch.linspace(0.5, 2.0, K)
        run = Run(torch.device("cpu"), False, K, 255)
        t = Trainer(model, model.head, optimizer, run.grad_scaler(), build_loss(params.loss, weights, 255), run)
        stats = train_epoch(t, iter(inputs), [(np.zeros(1, np.int64), True)] * len(inputs), "epoch 1")
        return model.head.state_dict(), stats

    with_empty, empty_stats = one_epoch([(feats, unlabelled), (feats, labelled), (feats, unlabelled)])
    without, stats = one_epoch([(feats, labelled)])
    assert with_empty.keys() == without.keys() and all(torch.equal(with_empty[k], without[k]) for k in without)
    assert empty_stats.loss == stats.loss and torch.equal(empty_stats.cm, stats.cm)


def test_a_newline_in_a_file_name_round_trips(repo):
    for folder in ("Color_Images", "Segmentation"):
        src = scene(repo, folder, 1, "val")
        src.rename(src.with_name("val\nnumber one.png"))
    for stage in ("prepare", "evaluate"):
        result = run_stage(repo, stage)
        assert result.returncode == 0, result.stderr
    assert json.loads((repo / "data/prepared/val/split.json").read_text())["names"] == \
        ["val\nnumber one.png", "val_00000.png", "val_00002.png"]
    classes = load_params(repo / "params.yaml").data.class_names
    names, _ = artifacts.read_per_image(classes, repo / artifacts.PER_IMAGE["val"])
    assert names == ["val\nnumber one.png", "val_00000.png", "val_00002.png"]


def predict(repo: Path, images: Path, out: Path, *extra: str) -> Outcome:
    return attempt(repo, "offroad.predict", args=("--images", str(images), "--out", str(out), *extra))


def test_predict_reads_a_file_name_that_is_not_utf8(repo, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(scene(repo, "Color_Images", 0, "val"), os.fsencode(folder) + b"/scene_\xff.png")
    outcome = predict(repo, folder, tmp_path / "out")
    assert outcome.result.returncode == 0, outcome.result.stderr
    assert os.listdir(os.fsencode(tmp_path / "out/masks")) == [b"scene_\xff.png"]


def test_predict_refuses_images_that_share_a_stem(repo, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    image = cv2.imread(str(scene(repo, "Color_Images", 0, "val")))
    for name in ("a.png", "a.jpg", "b.png"):
        cv2.imwrite(str(folder / name), image)
    outcome = predict(repo, folder, tmp_path / "out")
    assert_refused(outcome, f"{folder}: images share a name stem", "a.jpg, a.png; rename them")
    assert not (tmp_path / "out").exists()


def test_predict_refuses_to_write_into_its_input_folder(repo):
    val = repo / "data/synthetic/val"
    images = (val / "Color_Images").rename(val / "masks")  # --out val would write val/masks/NAME.png
    assert_refused(predict(repo, images, val, "--masks", str(val / "Segmentation")),
                   f"--out {val}: {val}/masks is the input folder {images}; its files would be overwritten")


def shared_name(repo: Path) -> None:
    for folder in ("Color_Images", "Segmentation"):
        shutil.copy(scene(repo, folder, 0, "val"), repo / "data/synthetic/train" / folder)


def class_missing(repo: Path) -> None:
    masks = np.load(repo / "data/prepared/train/masks.npy", mmap_mode="r+")
    masks[masks == CLASSES.index(next(c for c in CLASSES if c["name"] == "Dry Grass"))] = 0
    masks.flush()


WARNINGS = {
    "a class absent from the train masks": (
        "class_weights", class_missing,
        "have no pixel in the train masks (data/prepared/train): the model cannot learn them", "'Dry Grass'"),
    "an image name in both splits": (
        "prepare", shared_name,
        "1 image name(s) are in both the train (data/synthetic/train) and the val split (data/synthetic/val): "
        "val_00000.png", "optimistic"),
    "images smaller than data.image_size": (
        "prepare", params({"data.image_size": [252, 126]}),
        "6 image(s) in data/synthetic/train/Color_Images are smaller than data.image_size, so they are upscaled to "
        "252x126: train_00000.png (224x126)", "..."),
    "images of another aspect ratio": (
        "prepare", params({"data.image_size": [112, 112]}),
        "image(s) in data/synthetic/val/Color_Images are of an aspect ratio more than 25 % off", "stretched"),
    "test images also in train": ("prepare", lambda r: [shutil.copy(r / f"data/synthetic/train/{d}/train_00000.png",
                                                                  r / f"data/synthetic/test/{d}/train_00000.png")
                                                      for d in ("Color_Images", "Segmentation")],
                                  "1 image name(s) are in both the train (data/synthetic/train) and the test split "
                                  "(data/synthetic/test): train_00000.png", "optimistic"),
    "random backbone on real data": ("train", params({"data.root": "data/real"}),
                                     "model.weights is 'random' with data.root data/real", "-S model.weights=dinov2"),
}


@pytest.mark.parametrize("case", WARNINGS)
def test_a_likely_mistake_gets_a_warning_and_the_run_goes_on(repo, case):
    stage, change, *excerpts = WARNINGS[case]
    change(repo)
    result = run_stage(repo, stage)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert [w for w in warnings if all(e in w for e in excerpts)], result.stderr
