"""The ablation table: each Phase 2 part's share of the Phase 1 -> Phase 2 gain, with bootstrap intervals.

    python -m offroad.ablation [--full HEAD] [--base phase1] [--parts no-adamw no-epochs ...] [--out table.md]

Each part is an experiment that is Phase 2 (`--full`) with one change reverted to its Phase 1 value
(experiments/ablation/NAME.args, queued as `no-NAME`). A part's share is what reverting it loses, over the
whole gain: (full - without) / (full - base), on val mIoU. Its interval comes from the same paired bootstrap as
`offroad.review`: every side is scored on the same resamples of the val images all of them scored, and the
share is computed on each resample. Shares need not add up to 100 %: parts interact.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from offroad import bootstrap, metrics, review
from offroad.errors import run_cli

ARGS = Path("experiments/ablation")
# Section 8 of the report; it gives class weights and the LR schedule one share together.
CLAIMED = {"adamw": "~40 %", "epochs": "~30 %", "augment": "~20 %", "class_weights": "~10 % with schedule",
           "schedule": "(in class_weights)"}


def default_parts() -> list[str]:
    return [f"no-{p.stem}" for p in sorted(ARGS.glob("*.args"))]


@dataclass(frozen=True)
class Compared:
    """What the table compares and how: the Phase 2 and Phase 1 runs, the score, the bootstrap's draws."""
    full: str
    base: str
    score: str = "miou"
    resamples: int = bootstrap.RESAMPLES
    seed: int = bootstrap.SEED


@dataclass
class Row:
    part: str
    reverted: dict[str, object]  # the params that differ from the full recipe
    score: float
    lost: tuple[float, float, float]  # point, low, high
    share: tuple[float, float, float]


def common_images(sides: list[review.Side]) -> list[np.ndarray]:
    """Each side's [N, K, K] matrices of the val images every side scored, in the first side's order."""
    for side in sides:
        if side.per_image is None:
            raise review.ReviewError(review.missing_note(side))
    names = [dict(zip(s.per_image[0], range(len(s.per_image[0])))) for s in sides]
    shared = [n for n in sides[0].per_image[0] if all(n in index for index in names)]
    if not shared:
        raise review.ReviewError(f"{', '.join(s.rev for s in sides)}: no val image scored by all of them")
    return [s.per_image[1][[index[n] for n in shared]] for s, index in zip(sides, names)]


def _interval(point: float, samples: np.ndarray) -> tuple[float, float, float]:
    samples = samples[np.isfinite(samples)]  # a resample without any gain has no share
    if len(samples) == 0:
        return point, float("nan"), float("nan")
    low, high = np.quantile(samples, [(1 - bootstrap.LEVEL) / 2, (1 + bootstrap.LEVEL) / 2])
    return point, float(low), float(high)


def table(full: review.Side, base: review.Side, parts: list[review.Side], score: str = "miou",
          resamples: int = bootstrap.RESAMPLES, seed: int = bootstrap.SEED) -> tuple[list[Row], dict]:
    """The rows, and the whole gain {"full", "base", "gain": (point, low, high), "images", "sum": (...)}."""
    cms = common_images([full, base, *parts])
    weights = bootstrap.resample_weights(len(cms[0]), resamples, seed)
    point = [float(metrics.dataset_scores(c.sum(0))[score]) for c in cms]
    boot = [metrics.dataset_scores(bootstrap.resampled(c, weights))[score] for c in cms]
    gain, gain_boot = point[0] - point[1], boot[0] - boot[1]
    rows, shares = [], []
    for side, p, b in zip(parts, point[2:], boot[2:]):
        with np.errstate(divide="ignore", invalid="ignore"):
            share_boot = (boot[0] - b) / gain_boot
        shares.append(share_boot)
        reverted = {k: side.params.get(k) for k in sorted(full.params.keys() | side.params.keys())
                    if full.params.get(k) != side.params.get(k)}
        rows.append(Row(side.rev, reverted, p, _interval(point[0] - p, boot[0] - b),
                        _interval((point[0] - p) / gain if gain else float("nan"), share_boot)))
    total = sum(r.share[0] for r in rows)
    whole = {"full": point[0], "base": point[1], "gain": _interval(gain, gain_boot), "images": len(cms[0]),
             "sum": _interval(total, np.sum(shares, axis=0)) if rows else (0.0, 0.0, 0.0)}
    return rows, whole


def _pct(value: tuple[float, float, float]) -> str:
    if any(np.isnan(value)):
        return "—"  # no gain to share
    point, low, high = (round(100 * v) for v in value)  # ints: no "-0"
    return f"{point} % [{low}, {high}]"


def verdict(lost: tuple[float, float, float]) -> str:
    return "needed" if lost[1] > 0 else "reverting it helps" if lost[2] < 0 else "within noise"


def markdown(rows: list[Row], whole: dict, compared: Compared) -> str:
    full, base, score = compared.full, compared.base, compared.score
    gain = whole["gain"]
    lines = [f"Phase 2 (`{full}`) {score} {whole['full']:.4f}, Phase 1 (`{base}`) {whole['base']:.4f}: gain "
             f"{gain[0]:+.4f} [{gain[1]:+.4f}, {gain[2]:+.4f}].", ""]
    header = ["part", "reverted to", score, f"{score} lost [95 %]", "share of the gain [95 %]", "verdict",
              "report's claim"]
    body = []
    for r in rows:
        name = r.part.removeprefix("no-")
        changed = ", ".join(f"{k}={review.fmt(v)}" for k, v in r.reverted.items()) or "(nothing)"
        lost = f"{r.lost[0]:+.4f} [{r.lost[1]:+.4f}, {r.lost[2]:+.4f}]"
        body.append([f"`{r.part}`", changed, f"{r.score:.4f}", lost, _pct(r.share), verdict(r.lost),
                     CLAIMED.get(name, "—")])
    body.append(["sum", "", "", "", _pct(whole["sum"]), "", "~100 %"])
    lines += review.md_table(header, body)
    noise = "" if gain[1] > 0 else (" The gain itself is within noise here, so no share can be told from 0 or "
                                    "from 100 %.")
    lines += ["", f"Paired bootstrap over the {whole['images']} val images every run scored ({compared.resamples} "
              f"resamples, seed {compared.seed}). *needed*: reverting the part loses {score} beyond noise (the whole "
              f"interval of the loss is above 0).{noise}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m offroad.ablation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", default="HEAD", help="the Phase 2 run: revision or experiment (default HEAD)")
    parser.add_argument("--base", default="phase1", help="the Phase 1 run (default: the experiment phase1)")
    parser.add_argument("--parts", nargs="+", help="the ablation experiments (default: no-NAME for each "
                                                    f"{ARGS}/NAME.args)")
    parser.add_argument("--score", default="miou", choices=metrics.SCORES)
    parser.add_argument("--out", type=Path, help="write the markdown here, not to stdout")
    review.add_report_args(parser)
    args = parser.parse_args(argv)
    review.check_report_out(args.out, args.force, figures=False)
    parts = args.parts or default_parts()
    full, base, *ablated = (review.read_side(rev, figures=False) for rev in (args.full, args.base, *parts))
    review.same_classes([full, base, *ablated])
    rows, whole = table(full, base, ablated, args.score, args.resamples, args.seed)
    compared = Compared(args.full, args.base, args.score, args.resamples, args.seed)
    review.emit(markdown(rows, whole, compared), args.out, "ablation")


if __name__ == "__main__":
    run_cli(main, then="run the same command again")
