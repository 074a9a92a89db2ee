"""Mixed precision: bf16 autocast, or fp16 autocast with a grad scaler (pre-Ampere GPUs), on the CPU here."""

import pytest
import torch

from offroad.runtime import Run, choose_precision, cpu_flags, cpu_runs_bf16
from offroad.segmenter import build_model, place
from offroad.training import Outputs, RunInputs, fit
from tests.conftest import TINY, make_params, history_rows

TRAIN = {**TINY, "train.epochs": 2, "train.batch_size": 3, "train.device": "cpu", "augment.enabled": False,
         "loss.class_weighted": False, "optimizer.lr": 2e-3}


def train(tmp_path, **overrides):
    params = make_params({**TRAIN, **overrides})
    torch.manual_seed(0)
    model = build_model(params.model, params.data.num_classes)
    out = Outputs.inside(tmp_path)
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
        fit(model, params, RunInputs(tiny_dataset.train, tiny_dataset.val), Run.from_params(params, torch.device("cpu")),
            out, log=lambda _: None)
        rows[name] = history_rows(out.live)
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


AMX = {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}


@pytest.mark.parametrize("flags, env, capability, native", [
    (AMX, {}, "AVX512", True),
    ({"avx2", "avx512f", "avx512_bf16"}, {}, "AVX512", True),  # AMD EPYC Zen 4
    ({"avx2", "fma", "f16c"}, {}, "AVX2", False),  # AMD EPYC before Zen 4
    ({"avx2", "avx512f", "avx512bw"}, {}, "AVX512", False),  # Intel Xeon Ice Lake: AVX-512 without bf16
    (AMX, {"ONEDNN_MAX_CPU_ISA": "AVX2"}, "AVX512", False),  # an AMX machine acting as an AVX2 one
    (AMX, {"ONEDNN_MAX_CPU_ISA": "avx512_core"}, "AVX512", False),
    (AMX, {"DNNL_MAX_CPU_ISA": "AVX2"}, "AVX512", False),
    (AMX, {}, "AVX2", False),  # ATEN_CPU_CAPABILITY=avx2
    (AMX, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}, "AVX512", True),
    ({"fp", "asimd", "bf16"}, {}, "DEFAULT", True),  # aarch64 with BF16 (Features line)
    ({"fp", "asimd"}, {}, "DEFAULT", False),
    (set(), {}, "DEFAULT", False),  # no /proc/cpuinfo
])
def test_native_bf16_is_read_from_the_cpu_and_its_caps(flags, env, capability, native):
    assert cpu_runs_bf16(flags, env, capability) is native


def test_cpu_flags_reads_x86_flags_and_arm_features():
    assert cpu_flags("processor\t: 0\nflags\t\t: fpu avx2 amx_bf16\n") == {"fpu", "avx2", "amx_bf16"}
    assert cpu_flags("processor\t: 0\nFeatures\t: fp asimd bf16\n") == {"fp", "asimd", "bf16"}


@pytest.mark.parametrize("amp, amp_dtype, device, native, chosen, warned", [
    ("auto", "auto", "cpu", True, torch.bfloat16, False),
    ("auto", "auto", "cpu", False, None, False),
    ("auto", "auto", "cuda", True, torch.bfloat16, False),
    ("auto", "auto", "cuda", False, torch.float16, False),  # T4, V100: fp16 with the grad scaler
    ("auto", "fp16", "cpu", True, torch.float16, False),  # an explicit dtype wins where amp runs
    ("auto", "bf16", "cpu", False, None, False),  # but auto keeps a CPU without native bf16 in fp32
    ("auto", "bf16", "cuda", False, torch.bfloat16, True),
    (True, "auto", "cpu", False, torch.bfloat16, True),  # forced: bf16, with the slowdown named
    (True, "bf16", "cpu", False, torch.bfloat16, True),
    (True, "fp16", "cuda", True, torch.float16, False),
    (False, "bf16", "cpu", True, None, False),
    (False, "auto", "cuda", True, None, False),
])
def test_precision_is_chosen_by_the_hardware_unless_params_say(capsys, amp, amp_dtype, device, native, chosen, warned):
    train = make_params({"train.amp": amp, "train.amp_dtype": amp_dtype}).train
    precision = choose_precision(train, torch.device(device), native_bf16=native)
    assert precision.dtype == chosen
    assert str(precision).startswith({None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[chosen] + " (")
    err = capsys.readouterr().err
    assert ("emulated" in err and "slower than fp32" in err) == warned


def test_the_run_carries_the_choice_and_autocasts_by_it(monkeypatch):
    monkeypatch.setattr("offroad.runtime.cpu_runs_bf16", lambda: False)
    run = Run.from_params(make_params(TRAIN), torch.device("cpu"))
    assert (run.amp, run.precision) == (False, "fp32 (auto: CPU without native bf16)")
    with run.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    monkeypatch.setattr("offroad.runtime.cpu_runs_bf16", lambda: True)
    run = Run.from_params(make_params(TRAIN), torch.device("cpu"))
    assert (run.amp, run.amp_dtype, run.precision) == (True, torch.bfloat16, "bf16 (auto: CPU with native bf16)")
    with run.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
