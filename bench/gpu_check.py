"""One-command check of a CUDA machine: the CUDA tests, backbone and train-loop speed, a 30-epoch projection.

    python -m bench.gpu_check [--batch-sizes 2 16] [--workers 8] [--train-images 512] [--budget 220]

1. the GPU as torch sees it (name, compute capability, memory) and its bf16 matmul TFLOP/s;
2. `pytest tests/test_cuda.py` in a subprocess: any failure or skip fails the check;
3. the frozen backbone forward, bf16 autocast, batch 32 at 266x476 (best of a few, synchronized);
4. `offroad.training.fit`, the train stage's own loop, with the params.yaml recipe (Phase 2: augmentation
   on) on cuda with `--workers` DataLoader workers, once per batch size, on random prepared arrays of the
   real shape memory-mapped from a temporary folder; train images/s over the epochs after the first
   (bench.train_step.epoch_rate);
5. the projected wall time of 30 Phase 2 epochs on the real dataset (2857 train / 317 val images).
Stays within --budget seconds (4 minutes with start-up on an H100/H200): later steps are skipped, and the
check fails, when the budget runs out. Exits 1 with one line when there is no CUDA device.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.backbone import forward_flops
from bench.train_step import epoch_rate, with_changes
from offroad.artifacts import PreparedSplit, load_split, write_split
from offroad.config import Data, load_params
from offroad.evaluation import eval_features
from offroad.runtime import Run, configure_cpu
from offroad.segmenter import build_model

ROOT = Path(__file__).resolve().parents[1]
REAL_TRAIN, REAL_VAL, EPOCHS = 2857, 317, 30  # the report's dataset and recipe
MIN_TRAIN_RUN_S = 40  # skip a train-loop run with less budget left than this


def require_cuda() -> None:
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU build"
        sys.exit(f"no CUDA device: this check needs a GPU (torch {torch.__version__}, {build})")


def matmul_tflops(n: int = 8192, repeats: int = 10) -> float:
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return 2 * n**3 / best_cuda_seconds(lambda: a @ b, repeats) / 1e12


def best_cuda_seconds(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):  # cuBLAS/cuDNN handles, kernel selection, allocator
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def device_info() -> float:
    p = torch.cuda.get_device_properties(0)
    free, total = torch.cuda.mem_get_info(0)
    print(f"GPU 0 of {torch.cuda.device_count()}: {p.name}, compute capability {p.major}.{p.minor}, "
          f"{p.multi_processor_count} SMs, {total / 2**30:.1f} GiB ({free / 2**30:.1f} free), "
          f"bf16 {'supported' if torch.cuda.is_bf16_supported() else 'NOT supported (use train.amp_dtype: fp16)'}")
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
          f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.2f}")
    peak = matmul_tflops()
    print(f"matmul 8192x8192 bf16: {peak:.0f} TFLOP/s")
    return peak


def run_tests(timeout: float) -> str | None:
    """tests/test_cuda.py in a subprocess; the problem, or None when every test passed."""
    print(f"tests/test_cuda.py (timeout {timeout:.0f} s) ...", flush=True)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py"]
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    try:
        result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"tests/test_cuda.py did not finish in {timeout:.0f} s"
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    summary = lines[-1].strip("= ") if lines else f"no output (exit {result.returncode})"
    if result.returncode == 0 and "passed" in summary and "skipped" not in summary:
        print(f"tests: {summary}")
        return None
    print(result.stdout[-6000:] + result.stderr[-2000:], file=sys.stderr)
    return f"tests/test_cuda.py: {summary}"


def backbone_rates(params, peak_tflops: float, batch: int = 32, repeats: int = 5) -> float:
    """Print the backbone's batch-`batch` images/s; return single-image cached-feature images/s (how the
    train loop fills its val feature cache: offroad.evaluation.eval_features, one image per forward)."""
    w, h = params.data.image_size
    model = build_model(params.model, params.data.num_classes).to("cuda")
    x = torch.randn(batch, 3, h, w, device="cuda")

    def forward() -> None:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            model.backbone(x)
    seconds = best_cuda_seconds(forward, repeats)
    tflops = forward_flops(model.backbone, h, w) * batch / seconds / 1e12
    print(f"backbone {params.model.backbone} forward, bf16 autocast, batch {batch} at {h}x{w}: "
          f"{batch / seconds:.0f} images/s ({seconds * 1e3:.1f} ms/batch, {tflops:.0f} TFLOP/s = "
          f"{tflops / peak_tflops:.0%} of the matmul peak)")
    images = np.random.default_rng(0).integers(0, 256, (16, h, w, 3), dtype=np.uint8)
    run = Run.from_params(params, torch.device("cuda"))
    seconds = best_cuda_seconds(lambda: eval_features(model, images, run), 2, warmup=1)
    print(f"cached features (eval_features, one image per forward): {len(images) / seconds:.0f} images/s")
    return len(images) / seconds


def random_prepared(folder: Path, n_train: int, n_val: int, data: Data) -> tuple[PreparedSplit, PreparedSplit]:
    """Random images and masks of the real shape, written as prepare writes them and memory-mapped back."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        with write_split(folder, split, [f"{split}_{i:05d}" for i in range(n)], data) as (images, masks):
            for start in range(0, n, 64):
                stop = min(start + 64, n)
                images[start:stop] = rng.integers(0, 256, images[start:stop].shape, dtype=np.uint8)
                masks[start:stop] = rng.integers(0, data.num_classes, masks[start:stop].shape, dtype=np.uint8)
    return load_split(folder, "train", data), load_split(folder, "val", data)


def projection(rate: float, val_feature_rate: float) -> float:
    """Seconds for EPOCHS epochs on the real dataset: val features once, then each epoch at the measured
    end-to-end rate (which includes the val head pass and checkpoint writes at the real val:train ratio)."""
    return REAL_VAL / val_feature_rate + EPOCHS * REAL_TRAIN / rate


def print_projection(rates: dict[int, float], val_feature_rate: float, recipe_batch: int, size: tuple[int, int]) -> None:
    print(f"projected {EPOCHS}-epoch Phase 2 train stage, {REAL_TRAIN} train / {REAL_VAL} val images at "
          f"{size[0]}x{size[1]}:")
    for batch, rate in rates.items():
        note = (" (params.yaml's, the report's recipe)" if batch == recipe_batch else
                " (fewer optimizer steps per epoch: another recipe, re-tune optimizer.lr)")
        print(f"  batch {batch:3d}: {projection(rate, val_feature_rate) / 60:5.1f} min{note}")
    print(f"  assumes: val features computed once ({REAL_VAL} single-image forwards at {val_feature_rate:.0f} images/s), "
          f"then each epoch = {REAL_TRAIN} / (train images/s above), which includes the val head pass and checkpoint "
          f"writes at the real val:train ratio; no early stop; prepared arrays in the page cache; "
          f"DataLoader start-up and the stages other than train not counted")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=(2, 16),
                        help="train.batch_size values to time (params.yaml's, the report's, is 2)")
    parser.add_argument("--workers", type=int, default=8, help="train.num_workers")
    parser.add_argument("--train-images", type=int, default=512, help="random train images (val: the real ratio)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per timed run (the first is not counted)")
    parser.add_argument("--budget", type=float, default=220, help="seconds for the whole check")
    args = parser.parse_args()
    require_cuda()
    deadline = time.perf_counter() + args.budget
    left = lambda: deadline - time.perf_counter()  # noqa: E731
    problems = []
    configure_cpu()
    peak = device_info()

    problem = run_tests(timeout=max(30.0, min(150.0, left() - 60)))
    if problem:
        problems.append(problem)

    params = with_changes(load_params(), {"train.device": "cuda", "train.num_workers": args.workers,
                                          "train.epochs": args.epochs, "train.early_stopping_patience": 0})
    val_feature_rate = backbone_rates(params, peak)

    n_val = max(1, round(args.train_images * REAL_VAL / REAL_TRAIN))
    w, h = params.data.image_size
    print(f"train loop (offroad.training.fit): params.yaml recipe, augmentation "
          f"{'on (Phase 2)' if params.augment.enabled else 'OFF'}, {Run.from_params(params, torch.device('cuda')).precision}, "
          f"num_workers {args.workers}, {args.train_images} train / {n_val} val random images {w}x{h} "
          f"memory-mapped, {args.epochs} epochs, rate over epochs 2..{args.epochs}")
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        train, val = random_prepared(Path(tmp), args.train_images, n_val, params.data)
        for batch in args.batch_sizes:
            if left() < MIN_TRAIN_RUN_S:
                problems.append(f"batch {batch} not timed: {left():.0f} s of the budget left")
                continue
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            rate, share = epoch_rate(with_changes(params, {"train.batch_size": batch}), train, val, torch.device("cuda"))
            rates[batch] = rate
            print(f"  batch {batch:3d}: {rate:6.1f} train images/s end to end, {share:.0%} of each epoch in the "
                  f"backbone, peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB "
                  f"(run took {time.perf_counter() - start:.0f} s)")

    if rates:
        print_projection(rates, val_feature_rate, load_params().train.batch_size, (w, h))
    total = args.budget - left()
    if problems:
        sys.exit(f"gpu check FAILED after {total:.0f} s: " + "; ".join(problems))
    print(f"gpu check passed in {total:.0f} s")


if __name__ == "__main__":
    main()
