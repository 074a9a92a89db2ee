"""A half-finished run resumes only with the same prepared pixels: any change to them starts afresh."""
import shutil

import cv2
import pytest
import torch

from offroad.artifacts import load_split
from offroad.data import prepare_split
from offroad.runtime import Run
from offroad.segmenter import build_model
from offroad.training import Outputs, RunInputs, fit
from tests.conftest import TINY, make_params, history_rows


def interrupted_then_resumed(tmp_path, first, second, params):
    out = Outputs.inside(tmp_path)
    run = Run.from_params(params, torch.device("cpu"))

    def stop_after_epoch_1(line):
        if line.startswith("epoch   1/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        model = build_model(params.model, params.data.num_classes)
        fit(model, params, RunInputs(*first), run, out, log=stop_after_epoch_1)
    lines = []
    model = build_model(params.model, params.data.num_classes)
    fit(model, params, RunInputs(*second), run, out, log=lines.append)
    return lines[0]


@pytest.mark.parametrize("change", ["one mask pixel", "data.ignore_raw"])
def test_changed_prepared_pixels_start_a_fresh_run(tiny_dataset, tmp_path, change):
    params = make_params({**TINY, "train.epochs": 2, "train.device": "cpu", "augment.enabled": False,
                          "loss.class_weighted": False})
    root = shutil.copytree(tiny_dataset.root, tmp_path / "raw")
    data = params.data
    if change == "one mask pixel":  # the raw data changed under the same file names
        path = root / "val/Segmentation" / tiny_dataset.val.names[0]
        raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        raw[:4, :4] = 800 if raw[0, 0] != 800 else 700
        cv2.imwrite(str(path), raw)
    else:
        classes = [{"name": c.name, "raw": [r for r in c.raw if r != 600]} for c in data.classes]
        data = make_params({**TINY, "data.ignore_raw": [600], "data.classes": classes}).data  # Flowers ignored
    for split in ("train", "val"):
        prepare_split(root, split, tmp_path / "prepared", data, workers=1)
    changed = load_split(tmp_path / "prepared", "train"), load_split(tmp_path / "prepared", "val")
    assert changed[0].names == tiny_dataset.train.names and changed[1].images.shape == tiny_dataset.val.images.shape
    same = tiny_dataset.train, tiny_dataset.val
    assert "continuing after epoch 1" in interrupted_then_resumed(tmp_path / "same", same, same, params)
    assert "starting fresh" in interrupted_then_resumed(tmp_path / "changed", same, changed, params)


def tamper_head(state):
    state["head"] = {k: torch.zeros(3, *v.shape[1:]) for k, v in state["head"].items()}  # wrong shapes


def tamper_epoch(state):
    state["epoch"] = -1


def tamper_history(state):
    state["history"] = []  # its epoch left in place


@pytest.mark.parametrize("tamper, reason", [
    (tamper_head, "RuntimeError: Error(s) in loading state_dict"),
    (tamper_epoch, "epoch -1 is not a count"),
    (tamper_history, "it holds 0 history rows for 2 epochs"),
])
def test_a_damaged_resume_state_is_ignored_with_its_reason(tiny_dataset, tmp_path, tamper, reason):
    params = make_params({**TINY, "train.epochs": 2, "train.device": "cpu", "augment.enabled": False,
                          "loss.class_weighted": False})
    data = tiny_dataset.train, tiny_dataset.val
    out = tmp_path / "tampered"
    interrupted_then_resumed(out, data, data, params)
    state = torch.load(out / "last.pt", weights_only=True)
    state["complete"] = False  # as after an interrupt
    tamper(state)
    torch.save(state, out / "last.pt")
    model = build_model(params.model, params.data.num_classes)
    lines = []
    fit(model, params, RunInputs(*data), Run.from_params(params, torch.device("cpu")),
        Outputs.inside(out), log=lines.append)
    assert lines[0].startswith(f"resume: ignoring {out / 'last.pt'} (") and reason in lines[0]
    assert lines[0].endswith("; starting fresh")
    assert [r["epoch"] for r in history_rows(out / "dvclive")] == [1, 2]  # both epochs, from the start
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 2
