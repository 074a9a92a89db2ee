"""Stage `class_weights`: per-class pixel counts over the prepared train split and the loss weights
derived from them (python -m stages.class_weights)."""
from __future__ import annotations

from offroad import artifacts, atomic
from offroad.class_weights import compute_weights
from offroad.config import load_params
from offroad.errors import run_cli, warn


def main() -> None:
    params = load_params()
    names, cfg = params.data.class_names, params.class_weights
    atomic.check_writable(artifacts.CLASS_WEIGHTS, artifacts.CLASS_STATS)
    folder = artifacts.PREPARED / "train"
    masks = artifacts.load_split(artifacts.PREPARED, "train", params.data).masks
    counts = artifacts.label_counts(masks, folder, params.data, "there are no class frequencies to weigh by")
    absent = [n for n, c in zip(names, counts) if c == 0]
    if absent:
        warn(f"class(es) {absent} have no pixel in the train masks ({folder}): the model cannot learn them "
             "(check data.classes and the masks' raw ids)")
    weights = compute_weights(cfg.method, counts, cfg.max_weight)
    artifacts.write_class_weights(names, cfg.method, cfg.max_weight, counts, weights)
    shares = counts / max(counts.sum(), 1)
    print(f"class_weights ({cfg.method}) over {len(masks)} train masks:")
    for n, c, s, w in sorted(zip(names, counts, shares, weights), key=lambda row: -row[1]):
        print(f"  {n:<15} {c:>12,} px {100 * s:6.2f} %  weight {w:.4f}")


if __name__ == "__main__":
    run_cli(main)
