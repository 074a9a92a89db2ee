"""End-to-end train throughput as a fraction of backbone-only throughput, measured in one run.

    python -m bench.train_step [--workers 0 1 2] [--epochs 3] [--prepared data/prepared]

Runs `offroad.training.fit`, the train stage's own loop (memory-mapped loading, augmentation, backbone,
head, loss, confusion matrices, val on cached features, checkpoints), with the params.yaml recipe on the
prepared splits (random arrays of the same shape when there are none), once per DataLoader worker count,
then with augmentation off (Phase 1: train features cached, so epochs after the first are head-only).
Epoch 1 also computes the cached features, so the rates are over epochs 2.. Beside them: backbone-only
images/s at the train stage's images per forward (and at the train batch size), the share of each epoch
spent in the backbone (timed inside the loop, so it does not depend on load changing between
measurements), augmentation ms/image, the same run's matmul GFLOP/s and peak RSS.
"""
from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.backbone import best_seconds, matmul_gflops
from offroad.artifacts import PreparedSplit, load_split
from offroad.augment import build_augment
from offroad.config import Params, apply_overrides, load_params, validate
from offroad.data import SegmentationDataset
from offroad.runtime import Run, configure_cpu, resolve_device
from offroad.segmenter import build_model, place
from offroad.training import Outputs, RunInputs, batches_per_forward, fit


def with_changes(params: Params, changes: dict[str, Any]) -> Params:
    """`params` with dotted-key changes ({"train.epochs": 3}), validated."""
    return validate(apply_overrides(params.model_dump(mode="json"), changes), "bench params")


def splits(prepared: Path, params: Params) -> tuple[PreparedSplit, PreparedSplit, str]:
    if (prepared / "train" / "images.npy").is_file():
        return load_split(prepared, "train"), load_split(prepared, "val"), f"{prepared} (memory-mapped)"
    w, h = params.data.image_size
    rng = np.random.default_rng(0)

    def random_split(n: int) -> PreparedSplit:
        return PreparedSplit(rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8),
                             rng.integers(0, params.data.num_classes, (n, h, w), dtype=np.uint8), [""] * n)
    return random_split(params.synthetic.train), random_split(params.synthetic.val), "random arrays in memory"


def epoch_rate(params: Params, train: PreparedSplit, val: PreparedSplit, device: torch.device) -> tuple[float, float]:
    """Train images/s of fit's epochs after the first (each includes its val pass and checkpoint writes),
    and the share of that time spent in the backbone (Segmenter.features, timed in place)."""
    torch.manual_seed(params.train.seed)
    run = Run.from_params(params, device)
    model = place(build_model(params.model, params.data.num_classes), run)
    features, backbone = model.features, [0.0]

    def timed_features(images: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = features(images)
        out.sum().item()  # waits for the device
        backbone[0] += time.perf_counter() - start
        return out

    model.features = timed_features
    K = params.data.num_classes
    weights = torch.ones(K) if params.loss.class_weighted else None
    stamps = [(time.perf_counter(), 0.0)]
    with tempfile.TemporaryDirectory() as tmp:
        out = Outputs.inside(Path(tmp))
        fit(model, params, RunInputs(train, val, weights), run, out,
            log=lambda _: stamps.append((time.perf_counter(), backbone[0])))
    (t1, b1), (t2, b2) = stamps[1], stamps[-1]
    return len(train) * (len(stamps) - 2) / (t2 - t1), (b2 - b1) / (t2 - t1)


def backbone_rate(params: Params, device: torch.device, batch: int, repeats: int = 5) -> float:
    """Images/s of Segmenter.features alone (uint8 in, feature map out) at `batch` images per forward."""
    run_ = Run.from_params(params, device)
    model = place(build_model(params.model, params.data.num_classes), run_)
    w, h = params.data.image_size
    images = torch.randint(0, 256, (batch, h, w, 3), dtype=torch.uint8, device=device)

    def run() -> None:
        with run_.autocast():
            model.features(images).sum().item()  # .item(): waits for the device
    return batch / best_seconds(run, repeats)


def augment_ms(params: Params, train: PreparedSplit) -> float:
    """ms per image of SegmentationDataset.__getitem__ with augmentation (read + augment + to tensor)."""
    dataset = SegmentationDataset(train, build_augment(params.augment, params.data.ignore_index))
    n = min(len(train), 32)
    start = time.perf_counter()
    for i in range(n):
        dataset[i]
    return (time.perf_counter() - start) / n * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=(0, 1, 2), help="DataLoader workers to try")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run (the first is not counted)")
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    args = parser.parse_args()
    configure_cpu()
    params = with_changes(load_params(), {"train.epochs": args.epochs, "train.early_stopping_patience": 0})
    device = resolve_device(params.train.device)
    train, val, source = splits(args.prepared, params)
    cfg = params.train
    print(f"train step: {len(train)} train / {len(val)} val images {list(params.data.image_size)} from {source}, "
          f"batch {cfg.batch_size}, {Run.from_params(params, device).precision}, {device}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}")
    print("matmul 2048x2048: " + ", ".join(f"{n} {matmul_gflops(d):.0f} GFLOP/s"
                                            for n, d in (("fp32", torch.float32), ("bf16", torch.bfloat16))))
    chunk = batches_per_forward(cfg) * cfg.batch_size
    backbone = backbone_rate(params, device, chunk)
    print(f"backbone only, {chunk} images per forward as in the train stage (train.backbone_batch): "
          f"{backbone:.2f} images/s; at the train batch size {cfg.batch_size}: "
          f"{backbone_rate(params, device, cfg.batch_size):.2f} images/s")
    print(f"loading + augmentation: {augment_ms(params, train):.1f} ms/image in one process")
    if params.augment.enabled:
        for workers in args.workers:
            rate, share = epoch_rate(with_changes(params, {"train.num_workers": workers}), train, val, device)
            print(f"end to end, augmentation on, num_workers {workers}: {rate:.2f} images/s "
                  f"= {rate / backbone:.0%} of backbone-only; {share:.0%} of the time in the backbone")
    head, _ = epoch_rate(with_changes(params, {"augment.enabled": False}), train, val, device)
    print(f"head only (augmentation off, cached features): {head:.2f} images/s; backbone + head with no loading "
          f"overhead would be {1 / (1 / backbone + 1 / head):.2f} images/s "
          f"= {1 / (1 + backbone / head):.0%} of backbone-only")
    rss = [resource.getrusage(who).ru_maxrss / 1024 for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    print(f"peak RSS: {rss[0]:.0f} MiB (largest DataLoader worker {rss[1]:.0f} MiB); "
          f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
