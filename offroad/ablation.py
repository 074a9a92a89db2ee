"""The ablation table: each Phase 2 part's share of the Phase 1 -> Phase 2 gain, with bootstrap intervals.

    python -m offroad.ablation [--full phase2] [--base phase1] [--parts no-adamw no-epochs ...] [--out table.md]

Each part is Phase 2 (`--full`) with one change reverted to its Phase 1 value (experiments/ablation/NAME.args,
run as `no-NAME`). Every side is read as `offroad.review` reads one: committed evidence (evidence/NAME, one
run or a group of seeds), a revision or experiment, or several joined by commas. A part's share is what
reverting it loses, over the whole gain: (full - without) / (full - base), on test mIoU. Its interval comes
from the same bootstrap as `offroad.review`: every side is scored on the same resamples of the test images
all of them scored and, with several runs a side, on draws of its runs; the share is computed on each
resample. Shares need not add up to 100 %: parts interact.
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
    runs: int
    reverted: dict[str, object]  # the params that differ from the full recipe
    score: float
    lost: tuple[float, float, float]  # point, low, high
    share: tuple[float, float, float]


def _interval(point: float, samples: np.ndarray, level: float) -> tuple[float, float, float]:
    samples = samples[np.isfinite(samples)]  # a resample without any gain has no share
    if len(samples) == 0:
        return point, float("nan"), float("nan")
    low, high = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2])
    return point, float(low), float(high)


def level(parts: int) -> float:
    """Bonferroni over the table's verdicts: the gain's and one per part."""
    return 1 - (1 - bootstrap.LEVEL) / (parts + 1)


def table(full: review.Group, base: review.Group, parts: list[review.Group],
          compared: Compared = Compared("full", "base")) -> tuple[list[Row], dict]:
    """The rows, and the whole gain {"full", "base", "gain": (point, low, high), "images", "sum": (...)}."""
    cms, images, _ = review.common_images([full, base, *parts])
    weights = bootstrap.resample_weights(images, compared.resamples, compared.seed)
    pick = lambda m: {compared.score: metrics.dataset_scores(m)[compared.score]}  # noqa: E731
    found = bootstrap.groups_scores(cms, weights, pick, np.random.default_rng([compared.seed, 1]))
    point = [p[compared.score] for p, _ in found]
    boot = [b[compared.score] for _, b in found]
    at = level(len(parts))
    gain, gain_boot = point[0] - point[1], boot[0] - boot[1]
    rows, shares = [], []
    for side, p, b in zip(parts, point[2:], boot[2:]):
        with np.errstate(divide="ignore", invalid="ignore"):
            share_boot = (boot[0] - b) / gain_boot
        shares.append(share_boot)
        a, c = full.params, side.params
        reverted = {k: c.get(k) for k in sorted(a.keys() | c.keys()) if a.get(k) != c.get(k)}
        rows.append(Row(side.rev, len(side.runs), reverted, p, _interval(point[0] - p, boot[0] - b, at),
                        _interval((point[0] - p) / gain if gain else float("nan"), share_boot, at)))
    total = sum(r.share[0] for r in rows)
    whole = {"full": point[0], "base": point[1], "gain": _interval(gain, gain_boot, at), "images": images,
             "runs": (len(full.runs), len(base.runs)),
             "sum": _interval(total, np.sum(shares, axis=0), at) if rows else (0.0, 0.0, 0.0)}
    return rows, whole


def resolved(share: tuple[float, float, float], gain: tuple[float, float, float]) -> bool:
    """A share means something only when the gain it divides is well away from 0 (its interval's low end
    above half of it) and its own interval is narrower than 100 points."""
    return not any(np.isnan(share)) and gain[1] > gain[0] / 2 > 0 and share[2] - share[1] < 1


def _pct(value: tuple[float, float, float], gain: tuple[float, float, float]) -> str:
    if any(np.isnan(value)):
        return "—"  # no gain to share
    point, low, high = (round(100 * v) for v in value)  # ints: no "-0"
    shown = f"{point} % [{low}, {high}]"
    return shown if resolved(value, gain) else f"unresolved ({shown})"


def verdict(lost: tuple[float, float, float]) -> str:
    return "needed" if lost[1] > 0 else "reverting it helps" if lost[2] < 0 else "within noise"


def markdown(rows: list[Row], whole: dict, compared: Compared) -> str:
    full, base, score = compared.full, compared.base, compared.score
    gain, runs = whole["gain"], whole["runs"]
    at = f"{100 * level(len(rows)):.4g} %"
    lines = [f"Phase 2 (`{full}`, {runs[0]} run(s)) test {score} {whole['full']:.4f}, Phase 1 (`{base}`, {runs[1]} "
             f"run(s)) {whole['base']:.4f}: gain {gain[0]:+.4f} [{gain[1]:+.4f}, {gain[2]:+.4f}].", ""]
    header = ["part", "runs", "reverted to", score, f"{score} lost [{at}]", f"share of the gain [{at}]", "verdict",
              "report's claim"]
    body = []
    for r in rows:
        name = r.part.removeprefix("no-")
        shown = {k: v for k, v in r.reverted.items() if k != "train.seed"}
        changed = ", ".join(f"{k}={review.fmt(v)}" for k, v in shown.items()) or "(nothing)"
        lost = f"{r.lost[0]:+.4f} [{r.lost[1]:+.4f}, {r.lost[2]:+.4f}]"
        body.append([f"`{r.part}`", str(r.runs), changed, f"{r.score:.4f}", lost, _pct(r.share, gain),
                     verdict(r.lost), CLAIMED.get(name, "—")])
    body.append(["sum", "", "", "", "", _pct(whole["sum"], gain), "", "~100 %"])
    lines += review.md_table(header, body)
    noise = "" if gain[1] > 0 else (" The gain itself is within noise here, so no share can be told from 0 or "
                                    "from 100 %.")
    counts = [*runs, *(r.runs for r in rows)]
    training = (review.TRAINING_NOISE.format(runs=sum(counts), df=sum(counts) - len(counts)) if max(counts) > 1
                else "**Training noise is not included**: one run a side holds the trained models fixed.")
    lines += ["", f"Bootstrap over the {whole['images']} test images every run scored ({compared.resamples} "
              f"resamples, seed {compared.seed}). {training} {len(rows) + 1} verdicts (the gain and each part), "
              f"each interval at {at} (Bonferroni), so all hold together at 95 %. *needed*: reverting the part "
              f"loses {score} beyond noise (the whole interval of the loss is above 0). *unresolved*: the gain's "
              f"interval reaches below half the gain, or the share's is wider than 100 points, so the share's "
              f"size is not measured.{noise}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m offroad.ablation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", default="phase2", help="the Phase 2 side: evidence, revision or experiment, or "
                                                         "several joined by commas (default phase2)")
    parser.add_argument("--base", default="phase1", help="the Phase 1 side (default phase1)")
    parser.add_argument("--parts", nargs="+", help="the ablation experiments (default: no-NAME for each "
                                                    f"{ARGS}/NAME.args)")
    parser.add_argument("--score", default="miou", choices=metrics.SCORES,
                        help="the test-split score whose gain is shared out (default miou)")
    parser.add_argument("--out", type=Path, help="write the markdown here, not to stdout")
    review.add_report_args(parser)
    args = parser.parse_args(argv)
    review.check_report_out(args.out, args.force, figures=False)
    parts = args.parts or default_parts()
    full, base, *ablated = (review.read_group(rev, figures=False) for rev in (args.full, args.base, *parts))
    review.same_classes([full, base, *ablated])
    compared = Compared(args.full, args.base, args.score, args.resamples, args.seed)
    rows, whole = table(full, base, ablated, compared)
    review.emit(markdown(rows, whole, compared), args.out, "ablation")


def cli() -> None:
    """The console script."""
    run_cli(main, then="run the same command again")


if __name__ == "__main__":
    cli()
