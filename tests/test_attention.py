"""The attention kernel is chosen from the CPU's capabilities, never by timing, and both kernels compute the
same attention."""
import platform
import sys

import pytest
import torch
import torch.nn.functional as F

from offroad.runtime import choose_attention, cpu_flags
from offroad.vit import attention, build_backbone

# `flags` lines of /proc/cpuinfo on the two CPU types this project runs on (abridged to the SIMD flags).
INTEL_XEON_AMX = ("flags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma avx512f avx512dq avx512cd avx512bw "
                  "avx512vl avx512_vnni avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8")
AMD_EPYC_ZEN4 = ("flags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma avx512f avx512dq avx512cd avx512bw "
                 "avx512vl avx512_vnni avx512_bf16 avx512vbmi avx512_vbmi2 avx512_bitalg")
OLDER_X86 = "flags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma avx512f avx512bw"


@pytest.mark.parametrize("cpuinfo, kernel", [(INTEL_XEON_AMX, "sdpa"), (AMD_EPYC_ZEN4, "matmul"), (OLDER_X86, "sdpa"),
                                             ("processor\t: 0\n", "sdpa")])
def test_auto_picks_the_kernel_by_cpu_capabilities(cpuinfo, kernel):
    assert choose_attention("auto", cpu_flags(f"processor\t: 0\n{cpuinfo}\n"))[0] == kernel


def test_a_param_overrides_the_choice():
    for setting in ("sdpa", "matmul"):
        assert choose_attention(setting, cpu_flags(INTEL_XEON_AMX)) == (setting, "model.attention")
        assert choose_attention(setting, cpu_flags(AMD_EPYC_ZEN4)) == (setting, "model.attention")


@pytest.mark.skipif(platform.machine() != "x86_64" or sys.platform != "linux", reason="reads x86 Linux /proc/cpuinfo")
def test_this_machines_flags_are_read():
    assert {"sse2", "avx2"} <= cpu_flags()


def test_both_kernels_compute_attention():
    q, k, v = torch.randn(3, 2, 6, 50, 64).unbind(0)
    reference = torch.softmax(q.double() @ k.double().transpose(-2, -1) / 8, -1) @ v.double()
    for kernel in ("sdpa", "matmul"):
        assert torch.allclose(attention(q, k, v, kernel).double(), reference, atol=1e-5)
        out = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), kernel).double()
        assert (out - reference).abs().max() < 0.05
    manual = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), "matmul")
    assert not torch.equal(manual, F.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16()))


def test_set_attention_reaches_every_block():
    vit = build_backbone("dinov2_vits14")
    vit.set_attention("matmul")
    assert {block.attn.kernel for block in vit.blocks} == {"matmul"}
    with pytest.raises(ValueError, match="attention kernel 'flash' is not one of"):
        vit.set_attention("flash")


@pytest.mark.parametrize("kernel, sdpa_calls", [("sdpa", 12), ("matmul", 0)])
def test_the_chosen_kernel_is_the_one_that_runs(kernel, sdpa_calls, monkeypatch):
    # metrics/run/train.json records the choice: the bf16 forward must run that kernel, in every block
    calls, sdpa = [], F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    vit = build_backbone("dinov2_vits14").eval()
    vit.set_attention(kernel)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        vit(torch.randn(1, 3, 28, 42))
    assert len(calls) == sdpa_calls


def test_auto_takes_sdpa_on_a_gpu_whatever_the_host_cpu():
    for cpu in (INTEL_XEON_AMX, AMD_EPYC_ZEN4):
        assert choose_attention("auto", cpu_flags(cpu), device_type="cuda") == ("sdpa", "auto: GPU")
    assert choose_attention("matmul", cpu_flags(AMD_EPYC_ZEN4), device_type="cuda") == ("matmul", "model.attention")
