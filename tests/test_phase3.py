"""Phase 3 (report section 9) and Phase 2 with the multi-scale head as override files, and Phase 3 trained on tiny
data."""
from __future__ import annotations

import math

import pytest
import torch

from offroad.config import load_params, read_overrides, validate
from offroad.runtime import Run
from offroad.segmenter import build_model, load_segmenter
from offroad.training import Outputs, RunInputs, fit
from tests.conftest import REPO, TINY, with_overrides, history_rows

ARGS = {"phase3": REPO / "experiments/phase3.args", "phase2_multiscale": REPO / "experiments/phase2_multiscale.args"}
RECIPES = {
    "phase3": {"model.backbone": "dinov2_vitb14_reg", "model.head": "multiscale", "model.layers": 4,
               "loss.name": "focal_dice"},
    "phase2_multiscale": {"model.head": "multiscale", "model.layers": 4},
}


@pytest.mark.parametrize("name", ARGS)
def test_override_files_change_only_their_recipe_on_top_of_phase2(name):
    assert read_overrides(ARGS[name]) == RECIPES[name]
    default = load_params(REPO / "params.yaml").model_dump()
    recipe = validate(with_overrides(read_overrides(ARGS[name])), str(ARGS[name])).model_dump()
    changed = {f"{section}.{key}" for section in default for key in default[section]
               if default[section][key] != recipe[section][key]}
    assert changed == {k for k, v in RECIPES[name].items() if with_overrides()[k.split(".")[0]][k.split(".")[1]] != v}


def test_phase3_trains_and_evaluates_on_tiny_data(tiny_dataset, tmp_path):
    overrides = {**TINY, **read_overrides(ARGS["phase3"]), "train.epochs": 1, "train.batch_size": 3,
                 "train.num_workers": 0, "train.device": "cpu", "model.head_channels": 16}
    params = validate(with_overrides(overrides), "phase3 tiny")
    torch.manual_seed(0)
    model = build_model(params.model, params.data.num_classes)
    assert model.backbone.embed_dim == 768 and model.backbone.num_registers == 4 and model.layers == 4
    out = Outputs.inside(tmp_path)
    run = Run.from_params(params, torch.device("cpu"))
    weights = torch.linspace(0.5, 2.0, params.data.num_classes)
    fit(model, params, RunInputs(tiny_dataset.train, tiny_dataset.val, weights), run, out, log=lambda _: None)
    (row,) = history_rows(out.live)
    assert all(math.isfinite(float(v)) for v in row.values())
    segmenter, ckpt = load_segmenter(out.best, params.model, params.data.class_names, "cpu")
    assert ckpt["params"]["loss"]["name"] == "focal_dice" and ckpt["backbone"] == "dinov2_vitb14_reg"
    with torch.no_grad():
        logits = segmenter(torch.from_numpy(tiny_dataset.val.images[:1].copy()))
    assert logits.shape == (1, params.data.num_classes, *tiny_dataset.val.images.shape[1:3])
