"""The numbers in the docs, generated from the committed results: never typed by hand.

    python -m offroad.docs [--check]

Each block of README.md and docs/*.md between `<!-- generated: NAME -->` and `<!-- /generated -->` is
rewritten from metrics/ (the default run) and evidence/ (the runs the docs compare); a block named
`file:PATH` holds the committed file PATH (a benchmark's recorded output) verbatim. `--check` writes
nothing and exits 1, naming the stale blocks, when a block differs from what the files give (a test runs it).
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

from offroad import ablation, artifacts, atomic, evidence, review
from offroad.errors import PipelineError, run_cli

PAGES = (Path("README.md"), *sorted(Path("docs").glob("*.md")))
BLOCK = re.compile(r"(<!-- generated: ([\w:./-]+) -->\n)(.*?)(<!-- /generated -->)", re.S)
REPORT_MIOU = 0.4036  # the source report's Phase 2 val mIoU: its best epoch, chosen on val


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _train(root: Path = Path(".")) -> dict:
    """A run's train results and how it ran (dvclive/metrics.json and metrics/run/train.json)."""
    ran = root / artifacts.TRAIN_RUN
    return {**_json(root / artifacts.TRAIN_METRICS), **(_json(ran) if ran.is_file() else {})}


def _run_facts(train: dict) -> str:
    return f"{train.get('device', '?')}, {str(train.get('precision', '?')).split(' (')[0]}"


def results() -> str:
    """The default run's scores on test (the headline) and val (which chose the epoch)."""
    scored, train = _json(artifacts.EVAL_METRICS), _train()
    rows = []
    for split in (artifacts.HEADLINE, "val"):
        s = scored[split]
        rows.append([f"**{split}**" if split == artifacts.HEADLINE else split, str(s["images"]),
                     f"{s['miou']:.4f} [{s['miou_low']:.4f}, {s['miou_high']:.4f}]", f"{s['mdice']:.4f}",
                     f"{s['pixel_accuracy']:.4f}"])
    test, val = scored[artifacts.HEADLINE]["miou"], scored["val"]["miou"]
    table = review.md_table(["split", "images", "mIoU [95 % over images]", "mDice", "pixel accuracy"], rows)
    return "\n".join([*table, "", f"Epoch {scored['epoch']} of {train['epochs_run']}, chosen by val mIoU "
                      f"({_run_facts(train)}). Test minus val at that epoch: {test - val:+.4f} mIoU. The val "
                      f"score is the best of {train['epochs_run']} epochs on the images that picked it, so it can "
                      f"read high; test is scored once, on images no choice was made on. The report's "
                      f"{REPORT_MIOU} is such a best-epoch val score."])


def _runs(name: str) -> list[tuple[str, dict, dict, dict]]:
    folders = evidence.runs(name)
    if folders is None:
        raise PipelineError(f"evidence/{name}: not there; see README (Evidence)")
    return [(f.name, _json(f / artifacts.EVAL_METRICS), _train(f), _json(f / evidence.SOURCE)) for f in folders]


def seeds() -> str:
    """Phase 1 and Phase 2 per seed, from evidence/: val at the chosen epoch, test, and their spread."""
    rows, lines = [], []
    for name in ("phase1", "phase2"):
        runs = _runs(name)
        for seed, scored, train, _ in runs:
            rows.append([f"`{name}`", seed, str(scored["epoch"]), f"{scored['val']['miou']:.4f}",
                         f"{scored['test']['miou']:.4f}", f"{scored['test']['miou'] - scored['val']['miou']:+.4f}"])
        tests = [s["test"]["miou"] for _, s, _, _ in runs]
        vals = [s["val"]["miou"] for _, s, _, _ in runs]
        lines.append(f"`{name}`: test mIoU {statistics.mean(tests):.4f} ± {statistics.stdev(tests):.4f} (sd over "
                     f"{len(runs)} seeds), val at the chosen epoch {statistics.mean(vals):.4f}; test − val "
                     f"{statistics.mean(tests) - statistics.mean(vals):+.4f}.")
    machine = _runs("phase2")[0]
    made = f"Runs: {machine[3].get('machine', '?')}, {_run_facts(machine[2])}."
    return "\n".join([*review.md_table(["recipe", "seed", "epoch", "val mIoU", "test mIoU", "test − val"], rows),
                      "", *lines, made])


def _report_tables(old: str, new: str) -> str:
    """The metric verdicts and per-class rows of `offroad.review OLD NEW` from evidence/."""
    text = review.report(review.read_group(old, figures=False), review.read_group(new, figures=False))
    keep = []
    for section in text.split("\n\n### ")[2:4]:  # Metrics, Per-class IoU
        lines = section.splitlines()
        rows = [ln for ln in lines[1:] if not ln.startswith("| ") or ln.startswith("| metric") or
                any(ln.startswith(f"| **{k}**") for k in review.TESTED) or not section.startswith("Metrics")]
        keep.append("#### " + lines[0] + "\n" + "\n".join(rows).strip("\n"))
    return "\n\n".join(keep)


def review_phases() -> str:
    return f"```\n$ python -m offroad.review phase1 phase2\n```\n\n{_report_tables('phase1', 'phase2')}"


def review_seed() -> str:
    return f"```\n$ python -m offroad.review phase2/seed0 phase2/seed1\n```\n\n" + \
        _report_tables("phase2/seed0", "phase2/seed1").split("\n\n#### Per-class")[0]


def review_seed_groups() -> str:
    return f"```\n$ python -m offroad.review phase2 phase2-again\n```\n\n" + \
        _report_tables("phase2", "phase2-again").split("\n\n#### Per-class")[0]


def ablation_table() -> str:
    full, base = review.read_group("phase2", figures=False), review.read_group("phase1", figures=False)
    parts = [review.read_group(p, figures=False) for p in ablation.default_parts()]
    compared = ablation.Compared("phase2", "phase1")
    return "```\n$ python -m offroad.ablation\n```\n\n" + ablation.markdown(*ablation.table(full, base, parts, compared),
                                                                           compared).rstrip("\n")


def imbalance() -> str:
    stats = _json(artifacts.CLASS_STATS)
    present = {name: c["pixels"] for name, c in stats.items() if c["pixels"]}
    most, least = max(present, key=present.get), min(present, key=present.get)
    return (f"{present[most] / present[least]:.0f}× between {most} and {least} in the train masks "
            f"(`metrics/class_stats.json`)")


BLOCKS = {"results": results, "seeds": seeds, "review-phases": review_phases, "review-seed": review_seed,
          "review-seed-groups": review_seed_groups,
          "ablation": ablation_table, "imbalance": imbalance}


def check_markers(text: str, where: Path) -> None:
    """Every line that is a block marker is exactly an opening or a closing one, and they pair up: a block
    the pattern would not see must not pass unchecked."""
    opened = None
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not (line.startswith("<!--") and "generated" in line):
            continue
        closing = line == "<!-- /generated -->"
        if not closing and not re.fullmatch(r"<!-- generated: [\w:./-]+ -->", line):
            raise PipelineError(f"{where}:{number}: {line!r} is not a block marker; write "
                                "`<!-- generated: NAME -->` ... `<!-- /generated -->`")
        if closing == (opened is None):
            raise PipelineError(f"{where}:{number}: {line} " + ("closes no block" if closing else
                                f"opens a block inside the one opened on line {opened}"))
        opened = None if closing else number
    if opened is not None:
        raise PipelineError(f"{where}:{opened}: the block opened here has no `<!-- /generated -->`")


def render(text: str, where: Path) -> str:
    check_markers(text, where)

    def fill(match: re.Match) -> str:
        name = match[2]
        if name.startswith("file:"):  # a committed result file (a benchmark's output), verbatim
            path = Path(name.removeprefix("file:"))
            if not path.is_file():
                raise PipelineError(f"{where}: generated block {name!r}: {path} is not there")
            return f"{match[1]}```\n{path.read_text().rstrip()}\n```\n{match[4]}"
        if name not in BLOCKS:
            raise PipelineError(f"{where}: unknown generated block {name!r} (known: {', '.join(BLOCKS)})")
        return f"{match[1]}{BLOCKS[name]()}\n{match[4]}"
    return BLOCK.sub(fill, text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m offroad.docs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a block is stale")
    parser.add_argument("pages", nargs="*", type=Path, default=list(PAGES), help="markdown files (default: README.md docs/*.md)")
    args = parser.parse_args(argv)
    stale = []
    for page in args.pages:
        text = page.read_text()
        new = render(text, page)
        if new != text:
            stale.append(page)
            if not args.check:
                atomic.write_text(page, new)
    if args.check and stale:
        print(f"docs: stale generated numbers in {', '.join(map(str, stale))}; run `python -m offroad.docs`",
              file=sys.stderr)
        raise SystemExit(1)
    print(f"docs: {'checked' if args.check else 'wrote'} {len(args.pages)} page(s)"
          + (f", {len(stale)} updated" if stale and not args.check else ""))


def cli() -> None:
    """The console script."""
    run_cli(main)


if __name__ == "__main__":
    cli()
