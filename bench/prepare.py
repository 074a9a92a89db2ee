"""Prepare throughput: images/s of offroad.data.prepare_split (decode both PNGs, map ids, resize, write).

    python -m bench.prepare [--root data/synthetic] [--split train] [--workers 1 0]

Reads the raw split under --root (default: params data.root), or, when it does not exist, first writes
params `synthetic.train` scenes at the synthetic size into a temporary folder. Writes the prepared arrays
into a temporary folder once per worker count (0 = all cores) and prints images/s, with the peak RSS of
this process and of its decoding workers.
"""
from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

from offroad.config import load_params
from offroad.data import prepare_split
from offroad.errors import PipelineError
from offroad.raw import find_split, list_pairs
from offroad.synthetic import write_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, help="raw data root (default: params data.root)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--workers", type=int, nargs="+", default=(1, 0), help="decoding processes, 0 = all cores")
    args = parser.parse_args()
    params = load_params()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or Path(params.data.root)
        try:
            find_split(root, args.split)
        except PipelineError:
            cfg = params.synthetic
            root = Path(tmp) / "raw"
            write_dataset(root, {args.split: cfg.train}, cfg.seed, cfg.width, cfg.height, workers=os.cpu_count() or 1)
        n = len(list_pairs(find_split(root, args.split)))
        print(f"prepare: {n} {args.split} pairs from {root} -> {list(params.data.image_size)}, "
              f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
        for workers in args.workers:
            start = time.perf_counter()
            prepare_split(root, args.split, Path(tmp) / f"prepared{workers}", params.data, workers)
            seconds = time.perf_counter() - start
            print(f"workers {workers or os.cpu_count()}: {n / seconds:.1f} images/s ({seconds * 1e3 / n:.1f} ms/image)")
    rss = [resource.getrusage(who).ru_maxrss / 1024 for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    print(f"peak RSS: {rss[0]:.0f} MiB (largest worker {rss[1]:.0f} MiB); load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
