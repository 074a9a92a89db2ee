"""Train-step images/s of the Phase 2 and Phase 3 recipes (and Phase 2 with the multi-scale head), in one run,
and the 30-epoch train time they project at the real dataset's size.

    python -m bench.recipes [--steps 4] [--train 2857] [--val 317]

Each recipe is params.yaml plus its experiments/*.args overrides. A step is what training does per batch with
augmentation on: backbone features (frozen, no grad), head forward and backward, loss, optimizer step, at the
train batch size and image size, on random images. The projection: every epoch runs every train image through
backbone + head and every val image through the head (val features are computed once and cached), so
30 epochs ≈ 30 · (train / step rate + val / head rate) + val / backbone rate. It leaves out loading and
augmentation (~1-3 ms/image) and the evaluate stage.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from bench.backbone import best_seconds, matmul_gflops
from bench.train_step import with_changes
from offroad.config import Params, load_params, read_overrides
from offroad.losses import build_loss
from offroad.runtime import Run, configure_cpu, resolve_device
from offroad.segmenter import build_model, place
from offroad.training import make_optimizer

RECIPES = {"phase2": None, "phase2-multiscale": "experiments/phase2_multiscale.args",
           "phase3": "experiments/phase3.args"}


def rates(params: Params, device: torch.device, steps: int) -> dict[str, float]:
    """Images/s of a train step, of the backbone alone and of the head alone (inference), at the train batch."""
    torch.manual_seed(0)
    run = Run.from_params(params, device)
    model = place(build_model(params.model, params.data.num_classes), run)
    w, h = params.data.image_size
    b, K = params.train.batch_size, params.data.num_classes
    images = torch.randint(0, 256, (b, h, w, 3), dtype=torch.uint8, device=device)
    target = torch.randint(0, K, (b, h, w), device=device)
    loss_fn = build_loss(params.loss, torch.ones(K, device=device), params.data.ignore_index)
    optimizer = make_optimizer(params, model.head.parameters())

    def step() -> None:
        model.train()
        with run.autocast():
            logits = model.decode(model.features(images), (h, w))
        loss = loss_fn(logits.float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.item()

    def backbone() -> None:
        with run.autocast():
            model.features(images).sum().item()

    with run.autocast():
        features = model.features(images)

    def head() -> None:
        with torch.inference_mode(), run.autocast():
            model.decode(features, (h, w)).sum().item()
    model.eval()
    return {"step": b / best_seconds(step, steps), "backbone": b / best_seconds(backbone, steps),
            "head": b / best_seconds(head, steps)}


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per recipe (best one counts)")
    parser.add_argument("--train", type=int, default=2857, help="train images to project for (real dataset)")
    parser.add_argument("--val", type=int, default=317)
    args = parser.parse_args()
    configure_cpu()
    base = load_params()
    device = resolve_device(base.train.device)
    epochs = base.train.epochs
    print(f"{cpu_model()}, {torch.get_num_threads()} threads, {device}, load average {os.getloadavg()[0]:.2f}; "
          f"batch {base.train.batch_size} at {list(base.data.image_size)}, "
          f"{Run.from_params(base, device).precision}")
    print("matmul 2048x2048: " + ", ".join(f"{n} {matmul_gflops(d):.0f} GFLOP/s"
                                            for n, d in (("fp32", torch.float32), ("bf16", torch.bfloat16))))
    first = None
    for name, path in RECIPES.items():
        params = with_changes(base, read_overrides(path) if path else {})
        r = rates(params, device, args.steps)
        hours = (epochs * (args.train / r["step"] + args.val / r["head"]) + args.val / r["backbone"]) / 3600
        first = first or r["step"]
        m = params.model
        print(f"{name:18s} {m.backbone} {m.head} (layers {m.layers if m.head == 'multiscale' else 1}) "
              f"{params.loss.name}: train step {r['step']:.2f} img/s ({r['step'] / first:.2f}x phase2), "
              f"backbone {r['backbone']:.2f}, head {r['head']:.1f} img/s; "
              f"{epochs} epochs of {args.train} + {args.val} images ≈ {hours:.1f} h")
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
