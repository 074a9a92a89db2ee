"""Stage `synthesize`: write the embedded synthetic desert to data/synthetic (python -m stages.synthesize)."""
from __future__ import annotations

import os
import time

from offroad.artifacts import SYNTHETIC
from offroad.atomic import atomic_dir, check_writable
from offroad.config import load_params
from offroad.errors import run_cli
from offroad.synthetic import write_dataset


def main() -> None:
    cfg = load_params().synthetic
    check_writable(SYNTHETIC)
    counts = {"train": cfg.train, "val": cfg.val, "test": cfg.test}
    start = time.perf_counter()
    with atomic_dir(SYNTHETIC) as tmp:
        write_dataset(tmp, counts, cfg.seed, cfg.width, cfg.height, workers=os.cpu_count() or 1)
    seconds = time.perf_counter() - start
    total = sum(counts.values())
    print(f"synthesize: {cfg.train} train + {cfg.val} val + {cfg.test} test scenes at {cfg.width}x{cfg.height} in {SYNTHETIC} "
          f"({seconds:.1f} s, {total / seconds:.1f} images/s)")


if __name__ == "__main__":
    run_cli(main)
