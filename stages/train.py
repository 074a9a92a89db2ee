"""Stage `train`: fit the segmentation head on the prepared data (python -m stages.train).

With train.processes (per node) x train.nodes above 1 it is the launcher: it checks the inputs once, then
starts the DDP workers (offroad.launch), which run this module again inside the process group (gloo on the
CPU, nccl on CUDA). A hand-run `torchrun -m stages.train` starts workers directly.
"""
from __future__ import annotations

import torch
import torch.distributed

from offroad import artifacts, atomic, launch
from offroad.codebase import source_digest
from offroad.config import load_params
from offroad.errors import run_cli
from offroad.runtime import Run, configure_cpu, init_distributed, resolve_device
from offroad.segmenter import build_model, place
from offroad.training import RunInputs, fit, warn_about_weights


def main() -> None:
    params = load_params()
    data = params.data
    # everything that can be checked is checked here, in seconds, not after the first epoch
    atomic.check_writable(*artifacts.CHECKPOINTS.values(), artifacts.LAST, *artifacts.HISTORY_FILES,
                          artifacts.TRAIN_METRICS, artifacts.TRAIN_RUN)
    train = artifacts.load_split(artifacts.PREPARED, "train", data)
    val = artifacts.load_split(artifacts.PREPARED, "val", data)
    artifacts.label_counts(train.masks, artifacts.PREPARED / "train", data, "there is nothing to learn from")
    artifacts.label_counts(val.masks, artifacts.PREPARED / "val", data, "there is nothing to choose the best epoch by")
    weights = artifacts.read_class_weights(data.class_names) if params.loss.class_weighted else None
    if launch.needed(params.train):
        warn_about_weights(data.root, params.model.weights)
        return launch.launch(params.train, resolve_device(params.train.device), "stages.train")
    launch.die_with_launcher()
    configure_cpu()
    dist, device = init_distributed(resolve_device(params.train.device))
    if dist.world == 1:  # under a launcher, the launcher warned
        warn_about_weights(data.root, params.model.weights)

    run = Run.from_params(params, device, dist)
    torch.manual_seed(params.train.seed)  # the head's initial weights (torch seeds itself randomly at start-up)
    model = place(build_model(params.model, data.num_classes), run)

    log = print if dist.writes_outputs else (lambda _: None)
    log(f"train: {len(train)} train / {len(val)} val images, device {device}, {run.precision}, world {dist.world}, "
        f"backbone {params.model.backbone} ({params.model.weights}), augment {'on' if params.augment.enabled else 'off'}")
    fit(model, params, RunInputs(train, val, weights, source_digest("stages.train")), run, log=log)
    if dist.world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    run_cli(main, kept=f"the state after the last completed epoch (if any) is kept in {artifacts.LAST}")
