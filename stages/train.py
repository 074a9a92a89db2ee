"""Stage `train`: fit the segmentation head on the prepared data (python -m stages.train).

Runs unchanged under `torchrun --nproc_per_node=N -m stages.train` (DDP, gloo on CPU, nccl on CUDA).
"""
from __future__ import annotations

import torch
import torch.distributed

from offroad import artifacts
from offroad.config import load_params
from offroad.errors import run_cli
from offroad.runtime import Run, configure_cpu, init_distributed, resolve_device
from offroad.segmenter import build_model
from offroad.training import fit


def main() -> None:
    params = load_params()
    configure_cpu()
    dist, device = init_distributed(resolve_device(params.train.device))
    data = params.data
    train = artifacts.load_split(artifacts.PREPARED, "train", data)
    val = artifacts.load_split(artifacts.PREPARED, "val", data)
    weights = artifacts.read_class_weights(data.class_names) if params.loss.class_weighted else None

    torch.manual_seed(params.train.seed)  # the head's initial weights (torch seeds itself randomly at start-up)
    model = build_model(params.model, data.num_classes).to(device)
    head = torch.compile(model.head) if params.train.compile else model.head
    if dist.world > 1:
        head = torch.nn.parallel.DistributedDataParallel(head)
    run = Run(device, params.train.amp, data.num_classes, data.ignore_index, dist)

    log = print if dist.main else (lambda _: None)
    log(f"train: {len(train)} train / {len(val)} val images, device {device}, world {dist.world}, "
        f"backbone {params.model.backbone} ({params.model.weights}), augment {'on' if params.augment.enabled else 'off'}")
    summary = fit(model, head, params, train, val, weights, run, log=log)
    if dist.main:
        artifacts.write_train_metrics({
            **summary, "device": device.type, "world_size": dist.world, "amp": params.train.amp,
            "backbone": params.model.backbone, "backbone_weights": params.model.weights})
    if dist.world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    run_cli(main)
