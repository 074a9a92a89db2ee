"""Mixed precision: bf16 autocast, or fp16 autocast with a grad scaler (pre-Ampere GPUs), on the CPU here."""
import csv

import pytest
import torch

from offroad.runtime import Run
from offroad.segmenter import build_model, place
from offroad.training import Outputs, fit
from tests.conftest import TINY, make_params

TRAIN = {**TINY, "train.epochs": 2, "train.batch_size": 3, "train.device": "cpu", "augment.enabled": False,
         "loss.class_weighted": False, "optimizer.lr": 2e-3}


def train(tmp_path, **overrides):
    params = make_params({**TRAIN, **overrides})
    torch.manual_seed(0)
    model = build_model(params.model, params.data.num_classes)
    out = Outputs(*(tmp_path / f"{k}.pt" for k in ("best", "final", "last")), tmp_path / "history.csv")
    return params, model, out


@pytest.mark.parametrize("amp_dtype, scaled", [("bf16", False), ("fp16", True)])
def test_grad_scaler_only_for_fp16(amp_dtype, scaled):
    params = make_params({**TRAIN, "train.amp": True, "train.amp_dtype": amp_dtype})
    run = Run.from_params(params, torch.device("cpu"))
    assert run.grad_scaler().is_enabled() == scaled
    assert run.amp_dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[amp_dtype]
    with run.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == run.amp_dtype


def test_fp16_training_scales_the_loss_and_tracks_fp32(tmp_path, tiny_dataset):
    rows = {}
    for name, overrides in {"fp32": {"train.amp": False}, "fp16": {"train.amp": True, "train.amp_dtype": "fp16"}}.items():
        params, model, out = train(tmp_path / name, **overrides)
        fit(model, model.head, params, tiny_dataset.train, tiny_dataset.val, None, Run.from_params(params, torch.device("cpu")),
            out, log=lambda _: None)
        with open(out.history) as f:
            rows[name] = list(csv.DictReader(f))
        state = torch.load(out.last, weights_only=True)
        if name == "fp16":
            assert state["scaler"]["scale"] > 1  # the loss was scaled up before backward
        else:
            assert state["scaler"] is None
    for a, b in zip(rows["fp32"], rows["fp16"]):
        for key in ("train_loss", "val_loss", "val_acc"):
            assert float(b[key]) == pytest.approx(float(a[key]), abs=0.02)



@pytest.mark.parametrize("amp_dtype", ["bf16", "fp16"])
def test_backbone_weights_kept_in_the_autocast_dtype_give_the_same_features(amp_dtype):
    params = make_params({**TRAIN, "train.amp": True, "train.amp_dtype": amp_dtype, "model.backbone": "dinov2_vits14_reg"})
    run = Run.from_params(params, torch.device("cpu"))
    torch.manual_seed(0)
    plain = build_model(params.model, params.data.num_classes)
    kept = place(build_model(params.model, params.data.num_classes), run)
    images = torch.randint(0, 256, (2, 56, 112, 3), dtype=torch.uint8)
    with run.autocast():
        assert torch.equal(kept.features(images), plain.features(images))
    linear = kept.backbone.blocks[0].attn.qkv
    assert (linear.weight.dtype, linear.bias.dtype, kept.backbone.patch_embed.proj.weight.dtype) == (run.amp_dtype,) * 3
    assert kept.backbone.norm.weight.dtype == kept.backbone.pos_embed.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in kept.head.parameters())  # the trained part stays fp32


def test_fp32_runs_keep_fp32_weights():
    params = make_params({**TRAIN, "train.amp": False})
    model = place(build_model(params.model, params.data.num_classes), Run.from_params(params, torch.device("cpu")))
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_depthwise_convolutions_run_in_fp32_under_autocast():
    params = make_params(TRAIN)
    head = build_model(params.model, params.data.num_classes).head
    assert "block.0.weight" in head.state_dict()  # checkpoints keep their keys
    depthwise = head.block[0]
    x = torch.randn(2, depthwise.in_channels, 5, 7).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = depthwise(x)
        stem = head.stem[0](torch.randn(1, head.stem[0].in_channels, 5, 7))
    assert y.dtype == torch.float32 and stem.dtype == torch.bfloat16  # the stem stays in bf16
    expected = torch.nn.functional.conv2d(x.float(), depthwise.weight, depthwise.bias, padding=3,
                                          groups=depthwise.groups)
    torch.testing.assert_close(y, expected)
