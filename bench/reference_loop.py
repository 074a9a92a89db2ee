"""The train stage against the loop it replaces, on the same data in the same run.

    python -m bench.reference_loop [--train 8] [--val 4] [--epochs 3]

The hackathon-style loop (the reference script's Phase 1): frozen backbone in fp32, PNG decode (PIL) and
resize in every step, batch 2, SGD; each epoch a train pass, a val-loss pass, then metric passes over train
and val, so every image goes through the backbone twice per epoch and the train images three times. The
train stage runs params.yaml's Phase 2 recipe (`offroad.training.fit`: bf16, augmentation, val features
cached). Both use the same synthetic PNGs and the same model; the figure is train images per epoch-second.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from bench.backbone import matmul_gflops
from bench.train_step import epoch_rate, with_changes
from offroad.artifacts import load_split
from offroad.config import Params, load_params
from offroad.data import class_lut, prepare_split
from offroad.raw import find_split, list_pairs
from offroad.runtime import Run, configure_cpu
from offroad.segmenter import Segmenter, build_model
from offroad.synthetic import write_dataset


def read_pair(image_path: Path, mask_path: Path, lut: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The reference script's per-step loading: PIL decode, resize, raw ids to classes."""
    image = np.asarray(Image.open(image_path).convert("RGB").resize(size, Image.BILINEAR))
    mask = lut[np.asarray(Image.open(mask_path).resize(size, Image.NEAREST))]
    return image, mask.astype(np.int64)


def reference_epoch(model: Segmenter, optimizer: torch.optim.Optimizer, pairs: dict[str, list], lut: np.ndarray,
                    size: tuple[int, int], batch_size: int = 2) -> float:
    """One epoch of the reference loop; returns its seconds."""
    start = time.perf_counter()

    def batches(split: str):
        for i in range(0, len(pairs[split]), batch_size):
            loaded = [read_pair(img, mask, lut, size) for _, img, mask in pairs[split][i:i + batch_size]]
            yield (torch.from_numpy(np.stack([a for a, _ in loaded])), torch.from_numpy(np.stack([m for _, m in loaded])))

    def logits(images: torch.Tensor) -> torch.Tensor:  # the script's own upsampling, not Segmenter.decode's
        return F.interpolate(model.head(model.features(images)), size=images.shape[1:3], mode="bilinear",
                             align_corners=False)

    model.train()
    for images, masks in batches("train"):
        loss = F.cross_entropy(logits(images), masks, ignore_index=255)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        for images, masks in batches("val"):  # val loss
            F.cross_entropy(logits(images), masks, ignore_index=255)
        for split in ("train", "val"):  # metrics
            for images, masks in batches(split):
                logits(images).argmax(1).eq(masks).float().mean()
    return time.perf_counter() - start


def make_data(root: Path, params: Params, n_train: int, n_val: int) -> Params:
    cfg = params.synthetic
    write_dataset(root / "raw", {"train": n_train, "val": n_val}, cfg.seed, cfg.width, cfg.height, workers=os.cpu_count() or 1)
    for split in ("train", "val"):
        prepare_split(root / "raw", split, root / "prepared", params.data, workers=0)
    return params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=8)
    parser.add_argument("--val", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3, help="train stage epochs (the first is not counted)")
    args = parser.parse_args()
    configure_cpu()
    params = with_changes(load_params(), {"train.epochs": args.epochs, "train.early_stopping_patience": 0,
                                          "train.device": "cpu"})
    size = tuple(params.data.image_size)
    print(f"{args.train} train / {args.val} val synthetic images {params.synthetic.width}x{params.synthetic.height} -> "
          f"{list(size)}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}")
    print("matmul 2048x2048: " + ", ".join(f"{n} {matmul_gflops(d):.0f} GFLOP/s"
                                            for n, d in (("fp32", torch.float32), ("bf16", torch.bfloat16))))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_data(root, params, args.train, args.val)
        pairs = {s: list_pairs(find_split(root / "raw", s)) for s in ("train", "val")}
        torch.manual_seed(0)
        model = build_model(params.model, params.data.num_classes)
        optimizer = torch.optim.SGD(model.head.parameters(), lr=1e-4, momentum=0.9)
        reference_epoch(model, optimizer, {s: p[:2] for s, p in pairs.items()}, class_lut(params.data), size)  # warm-up
        seconds = reference_epoch(model, optimizer, pairs, class_lut(params.data), size)
        reference = args.train / seconds
        print(f"hackathon loop (Phase 1: fp32, PIL per step, batch 2, val-loss + 2 metric passes): "
              f"{reference:.2f} train images per epoch-second ({seconds:.1f} s per epoch)")
        train, val = load_split(root / "prepared", "train"), load_split(root / "prepared", "val")
        ours, _ = epoch_rate(params, train, val, torch.device("cpu"))
        print(f"train stage (Phase 2 recipe of params.yaml: {Run.from_params(params, torch.device('cpu')).precision}, augmentation "
              f"{'on' if params.augment.enabled else 'off'}, batch {params.train.batch_size}): {ours:.2f} train images "
              f"per epoch-second")
        print(f"ratio: train stage / hackathon loop = {ours / reference:.2f}x (load average {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
