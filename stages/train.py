"""Stage `train`: fit the segmentation head on the prepared data (python -m stages.train).

Runs unchanged under `torchrun --nproc_per_node=N -m stages.train` (DDP, gloo on CPU, nccl on CUDA).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from stages import artifacts
from stages.augment import build_augment
from stages.dataset import load_split
from stages.errors import run_cli
from stages.losses import build_loss, load_class_weights
from stages.model import build_model
from stages.params import load_params
from stages.runtime import configure_cpu, resolve_device
from stages.training import Dist, fit

PREPARED = Path("data/prepared")
CLASS_WEIGHTS = Path("data/class_weights.json")
OUT = {"best": Path("models/best.pt"), "final": Path("models/final.pt"), "last": Path("models/last.pt"),
       "history": Path("plots/train/history.csv")}
METRICS = Path("metrics/train.json")


def init_distributed(device: torch.device) -> tuple[Dist, torch.device]:
    if "WORLD_SIZE" not in os.environ:
        return Dist(), device
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return Dist(dist.get_rank(), dist.get_world_size()), device


def main() -> None:
    params = load_params()
    configure_cpu()
    ddp, device = init_distributed(resolve_device(params.train.device))
    names, ignore = params.data.class_names, params.data.ignore_index
    train, val = load_split(PREPARED, "train"), load_split(PREPARED, "val")
    weights = load_class_weights(CLASS_WEIGHTS, names) if params.loss.class_weighted else None

    torch.manual_seed(params.train.seed)  # the head's initial weights (torch seeds itself randomly at start-up)
    model = build_model(params.model, len(names)).to(device)
    head = torch.compile(model.head) if params.train.compile else model.head
    if ddp.world > 1:
        head = torch.nn.parallel.DistributedDataParallel(head)
    loss_fn = build_loss(params.loss, None if weights is None else weights.to(device), ignore)
    augment = build_augment(params.augment, ignore)

    log = print if ddp.main else (lambda _: None)
    log(f"train: {len(train)} train / {len(val)} val images, device {device}, world {ddp.world}, "
        f"backbone {params.model.backbone} ({params.model.weights}), augment {'on' if augment else 'off'}")
    summary = fit(model, head, params, train, val, loss_fn, augment, weights, device, OUT, ddp, log)
    if ddp.main:
        artifacts.write_json(METRICS, {**summary, "device": device.type, "world_size": ddp.world,
                                       "amp": params.train.amp, "backbone": params.model.backbone,
                                       "backbone_weights": params.model.weights})
    if ddp.world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    run_cli(main)
