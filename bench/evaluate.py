"""Evaluate throughput (images/s) of offroad.evaluation.evaluate on images at the params.yaml image size.

    python -m bench.evaluate [--images 16] [--device cpu] [--no-amp]

Random images and masks and an untrained head: the cost is the model, loss and confusion matrix,
not the scores. Also prints the same run's matmul GFLOP/s and peak RSS.
"""
from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from bench.backbone import matmul_gflops
from bench.train_step import with_changes
from offroad.artifacts import PreparedSplit
from offroad.config import load_params
from offroad.evaluation import Scoring, evaluate, image_features
from offroad.losses import build_loss
from offroad.runtime import Run, configure_cpu, resolve_device
from offroad.segmenter import build_model, place


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--device", help="default: params train.device")
    parser.add_argument("--no-amp", action="store_true", help="fp32 instead of what params train.amp chooses")
    args = parser.parse_args()
    configure_cpu()
    params = load_params()
    data, batch = params.data, params.evaluate.batch_size
    device = resolve_device(args.device or params.train.device)
    if args.no_amp:
        params = with_changes(params, {"train.amp": False})
    w, h = data.image_size
    rng = np.random.default_rng(0)
    split = PreparedSplit(rng.integers(0, 256, (args.images, h, w, 3), dtype=np.uint8),
                          rng.integers(0, data.num_classes, (args.images, h, w), dtype=np.uint8),
                          [f"{i}" for i in range(args.images)])
    run_ = Run.from_params(params, device)
    segmenter = place(build_model(params.model, data.num_classes), run_)
    loss_fn = build_loss(params.loss, torch.ones(data.num_classes, device=device), data.ignore_index)

    def run(s: PreparedSplit) -> None:
        evaluate(segmenter, loss_fn, Scoring(image_features(segmenter, s.images, run_), s.masks, np.arange(len(s)),
                                             batch), run_)

    run(PreparedSplit(split.images[:batch], split.masks[:batch], split.names[:batch]))  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    run(split)  # ends with a copy to the CPU, so the clock includes the device work
    seconds = time.perf_counter() - start
    print(f"evaluate: {args.images / seconds:.2f} images/s ({args.images} images {w}x{h}, batch {batch}, "
          f"{device}, {run_.precision}, {params.model.backbone} + {params.model.head} head, "
          f"{torch.get_num_threads()} threads)")
    print("matmul 2048x2048: " + ", ".join(f"{n} {matmul_gflops(d):.0f} GFLOP/s"
                                            for n, d in (("fp32", torch.float32), ("bf16", torch.bfloat16))))
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
