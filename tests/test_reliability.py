"""Bad input through the real stage commands, atomic outputs, safe loading and reproducibility.

Every case of the catalogue runs `python -m stages.NAME` in a copy of a tiny, fully built project and
asserts: exit status 1, one `error: ...` line naming the problem and no traceback, and every file
under data/, models/, metrics/ and plots/ byte-for-byte as it was, with no temporary left behind.
The validators themselves are tested function by function in test_params, test_dataset, test_model.
"""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import pytest
import torch

from offroad import atomic as artifacts
from tests.conftest import REPO, REPO_FILES, TINY, run_dvc, with_overrides, write_params

# The whole pipeline in ~30 s: 6 + 3 synthetic scenes at 112x56, two epochs, a small head.
PIPELINE = {**TINY, "train.epochs": 2, "train.num_workers": 0, "train.device": "cpu", "model.head_channels": 16,
            "evaluate.examples": 2, "plot.dpi": 30}
OUTPUTS = ("data", "models", "metrics", "plots")
CLASSES = with_overrides()["data"]["classes"]
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


def run_stage(repo: Path, stage: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=repo, env={**ENV, **(env or {})},
                          capture_output=True, text=True, timeout=300)


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


def attempt(repo: Path, stage: str, env: dict | None = None) -> Outcome:
    before = snapshot(repo)
    result = run_stage(repo, stage, env)
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


CATALOGUE = {
    # params.yaml (every stage validates the whole file before it reads anything else)
    "params: unknown key": ("train", params({"optimizer.lrr": 1e-3}),
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
    message = assert_refused(attempt(repo, "train", env=offline))
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
    artifacts.write_json(tmp_path / "x.json", {"a": 1})
    with artifacts.atomic_dir(tmp_path / "out") as tmp:
        (tmp / "f").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([
        "x.json", "out", f".x.json.{alive}.tmp", f".out.{alive}.tmpdir", f".out.{alive}.old", f".y.json.{dead}.tmp"])
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 1}
    assert (tmp_path / "out/f").read_text() == "new"


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    artifacts.write_text(tmp_path / "a.txt", "old")
    with pytest.raises(ZeroDivisionError), artifacts.atomic_path(tmp_path / "a.txt") as tmp:
        tmp.write_text("half")
        1 / 0
    with pytest.raises(ZeroDivisionError), artifacts.atomic_dir(tmp_path / "d") as tmp:
        (tmp / "f").write_text("half")
        1 / 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
    assert (tmp_path / "a.txt").read_text() == "old"


def test_save_torch_gives_the_same_bytes_wherever_and_whoever_writes(tmp_path):
    obj = {"head": {"w": torch.arange(6.0).view(2, 3)}, "epoch": 3}
    artifacts.save_torch(tmp_path / "a.pt", obj)
    code = ("import sys, torch; from offroad import atomic as artifacts; "
            "artifacts.save_torch(sys.argv[1], {'head': {'w': torch.arange(6.0).view(2, 3)}, 'epoch': 3})")
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
    assert [name for name, tree in trees.items() if calls(tree, "yaml", {"safe_load"})] == ["config.py"]
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
    speed = [json.loads(s.pop("metrics/speed/train.json")) for s in (first, second)]
    assert speed[0].keys() == speed[1].keys() == {"train_seconds", "images_per_second", "backbone_seconds_saved"}
    different = sorted(k for k in first if first[k] != second[k])
    assert different == []  # data, class weights, checkpoints, metrics, history, evaluation, PNGs
