"""Backbone throughput at the pipeline's input size, as a fraction of this machine's matmul peak.

    python -m bench.backbone [--backbone dinov2_vits14] [--size 266 476] [--batches 1 8] [--repeats 3]

Prints images/s of the frozen backbone forward (fp32; bf16 autocast with fp32 weights, and with the weights kept
in bf16 as the stages run it) beside the same run's 2048x2048 matmul GFLOP/s, the exact matmul FLOPs of one
forward, the ceiling its own matmul kernels set (each GEMM and attention core timed alone), the attention core's
GFLOP/s per kernel, the bf16-vs-fp32 output difference and peak RSS.
"""
from __future__ import annotations

import argparse
import copy
import resource
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from offroad.runtime import choose_attention, configure_cpu, cpu_runs_bf16
from offroad.vit import DinoVisionTransformer, attention, build_backbone

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: allocations, oneDNN primitive creation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    return 2 * n**3 / best_seconds(lambda: a @ b, repeats) / 1e9


def forward_flops(model: DinoVisionTransformer, h: int, w: int) -> int:
    """Matmul FLOPs (2 per multiply-add) of one forward at h x w, from the architecture."""
    C, p = model.embed_dim, model.patch_size
    n_patches = (h // p) * (w // p)
    N = 1 + model.num_registers + n_patches
    patch = 2 * n_patches * 3 * p * p * C
    block = 2 * N * C * (3 * C + C + 2 * 4 * C) + 2 * 2 * N * N * C  # qkv, proj, mlp; q@k^T and attn@v
    return patch + len(model.blocks) * block


def counted_flops(model: DinoVisionTransformer, x: torch.Tensor) -> int:
    # the math backend decomposes attention into matmuls the counter sees (the CPU flash kernel it misses)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


def attention_seconds(model: DinoVisionTransformer, tokens: int, batch: int, dtype: torch.dtype, fn: Callable,
                      repeats: int = 3) -> float:
    """One attention core call alone (`fn(q, k, v)`) at one block's shapes."""
    heads = model.blocks[0].attn.heads
    q, k, v = torch.randn(3, batch, heads, tokens, model.embed_dim // heads).to(dtype)
    return best_seconds(lambda: fn(q, k, v), repeats)


def attention_gflops(model: DinoVisionTransformer, tokens: int, batch: int, dtype: torch.dtype,
                     fn: Callable = F.scaled_dot_product_attention) -> float:
    flops = 4 * batch * tokens * tokens * model.embed_dim
    return flops / attention_seconds(model, tokens, batch, dtype, fn) / 1e9


def kernels_seconds(model: DinoVisionTransformer, tokens: int, batch: int, dtype: torch.dtype) -> float:
    """One forward's matmul kernels, each timed alone at its shapes: every block's four Linear GEMMs (bias
    included) and its attention core (the kernel the model uses). What no fusion of the rest can beat."""
    block, C = model.blocks[0], model.embed_dim
    rows = torch.randn(batch * tokens, C).to(dtype)
    hidden = torch.randn(batch * tokens, 4 * C).to(dtype)
    gemms = [(rows, block.attn.qkv), (rows, block.attn.proj), (rows, block.mlp.fc1), (hidden, block.mlp.fc2)]
    seconds = sum(best_seconds(lambda x=x, w=m.weight.to(dtype), b=m.bias.to(dtype): F.linear(x, w, b), 5)
                  for x, m in gemms)
    seconds += attention_seconds(model, tokens, batch, dtype, lambda q, k, v: attention(q, k, v, block.attn.kernel), 5)
    return len(model.blocks) * seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="dinov2_vits14")
    parser.add_argument("--size", type=int, nargs=2, default=(266, 476), metavar=("H", "W"))
    parser.add_argument("--batches", type=int, nargs="+", default=(1, 8))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--attention", default="auto", choices=("auto", "sdpa", "matmul"),
                        help="CPU bf16 attention kernel (auto: by the CPU's capabilities, as model.attention)")
    args = parser.parse_args()
    configure_cpu()
    h, w = args.size
    model = build_backbone(args.backbone)
    kernel, why = choose_attention(args.attention)
    model.set_attention(kernel)
    flops = forward_flops(model, h, w)
    print(f"{args.backbone} at {h}x{w}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"attention {kernel} ({why})")
    print(f"one forward: {flops / 1e9:.2f} GFLOP of matmuls by formula, "
          f"{counted_flops(model, torch.zeros(1, 3, h, w)) / 1e9:.2f} counted by torch FlopCounterMode")
    peak = {name: matmul_gflops(dtype) for name, dtype in DTYPES.items()}
    native = {"fp32": True, "bf16": cpu_runs_bf16()}
    print("2048x2048 matmul: " + ", ".join(f"{name} {g:.0f} GFLOP/s" + ("" if native[name] else " (emulated)")
                                           for name, g in peak.items()))

    def of_peak(achieved: float, name: str) -> str:
        if native[name]:
            return f"= {achieved / peak[name]:4.0%} of the {name} matmul peak"
        return f"(no {name} peak to compare with: this CPU emulates {name})"

    kept = copy.deepcopy(model)
    kept.keep_weights_in(torch.bfloat16)  # as the stages run it under bf16 amp (segmenter.place)

    def forward(x: torch.Tensor, dtype: torch.dtype, net: DinoVisionTransformer = model) -> torch.Tensor:
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            return net(x)

    variants = [("fp32", "fp32", model), ("bf16", "bf16 autocast, fp32 weights cast per call", model),
                ("bf16", "bf16 autocast, weights kept in bf16 (the stages)", kept)]
    for name, label, net in variants:
        for batch in args.batches:
            x = torch.randn(batch, 3, h, w)
            seconds = best_seconds(lambda: forward(x, DTYPES[name], net), args.repeats)
            achieved = flops * batch / seconds / 1e9
            print(f"{label} batch {batch}: {batch / seconds:6.2f} img/s, {achieved:5.0f} GFLOP/s {of_peak(achieved, name)}")
    tokens = 1 + model.num_registers + (h // model.patch_size) * (w // model.patch_size)
    batch = args.batches[-1]
    for name, dtype in DTYPES.items():
        achieved = flops * batch / kernels_seconds(model, tokens, batch, dtype) / 1e9
        print(f"{name} matmul kernels alone, batch {batch} (each Linear GEMM and the attention core timed on its "
              f"own): {achieved:5.0f} GFLOP/s {of_peak(achieved, name)}, the ceiling of a forward with these kernels")
    for what, fn in (("SDPA", F.scaled_dot_product_attention), ("matmul -> softmax -> matmul", attention)):
        rates = [f"{name} {attention_gflops(model, tokens, batch, dtype, fn):.0f}" for name, dtype in DTYPES.items()]
        print(f"attention core alone ({what}, batch {batch}): {', '.join(rates)} GFLOP/s")
    x = torch.randn(1, 3, h, w)
    reference = forward(x, torch.float32)
    diff = (forward(x, torch.bfloat16).float() - reference).abs()
    print(f"bf16 vs fp32 tokens: max abs diff {diff.max():.4f}, mean {diff.mean():.5f} "
          f"(fp32 tokens: std {reference.std():.3f}, max abs {reference.abs().max():.2f})")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
