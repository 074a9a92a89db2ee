"""A review report: what changed between two runs or groups of runs, and whether the scores moved beyond noise.

    python -m offroad.review [OLD] [NEW] [--out report.md] [--resamples 1000] [--seed 0] [--fail-on-worse]

OLD and NEW are each committed evidence (evidence/NAME: one run, or a group such as seed replicates), a
git revision, branch, tag or DVC experiment, several of those joined by commas (a group), or `workspace`
(the files on disk). Defaults: HEAD against the workspace. The markdown lists the params that changed, each
metric old -> new, and for the test split's scores a verdict (better / worse / within noise) from a
bootstrap over the test images both sides scored and, with several runs a side, over the runs
(offroad.bootstrap); the per-class test IoU with paired intervals; and both sides' figures.
"""
from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from offroad import artifacts, atomic, bootstrap, evidence, guard
from offroad.artifacts import HEADLINE
from offroad.errors import PipelineError, run_cli, warn
from offroad.metrics import SCORES, dataset_scores

WORKSPACE = evidence.WORKSPACE
MAX_RESAMPLES = 100_000  # each resample is an [N] row of draw counts and a [K, K] matrix per side
TESTED = tuple(f"{HEADLINE}.{s}" for s in SCORES)  # the metrics that get a verdict


class ReviewError(PipelineError):
    pass


@dataclass
class Side:
    """One run."""
    rev: str
    params: dict[str, Any]  # flat: "optimizer.lr" -> value
    metrics: dict[str, Any]  # flat, from dvclive/metrics.json and metrics/evaluate.json (per_class left out): {} if none
    per_class: dict[str, dict]  # the test split's per_class
    per_image: tuple[list[str], np.ndarray] | None  # the test images' names and [N, K, K] counts; None if not there
    figures: dict[str, bytes]  # plots/images/NAME.png -> bytes

    @property
    def classes(self) -> list[str]:
        return [c.get("name") for c in self.params.get("data.classes", []) if isinstance(c, dict)]


@dataclass
class Group:
    """What one side of a review is: one run, or several runs of one recipe (seeds)."""
    name: str
    runs: list[Side]

    @property
    def rev(self) -> str:
        return self.name

    @property
    def params(self) -> dict[str, Any]:
        """Each param's value, or the values joined by ", " where the runs differ (the seed)."""
        keys = dict.fromkeys(k for r in self.runs for k in r.params)
        return {k: _common([r.params.get(k, "—") for r in self.runs]) for k in keys}

    @property
    def metrics(self) -> dict[str, Any]:
        """Numbers: the mean over the runs; other values as in params."""
        keys = dict.fromkeys(k for r in self.runs for k in r.metrics)
        values = {k: [r.metrics.get(k) for r in self.runs] for k in keys}
        return {k: float(np.mean(v)) if all(_is_number(x) for x in v) else _common(v) for k, v in values.items()}

    @property
    def classes(self) -> list[str]:
        return self.runs[0].classes


def _common(values: list) -> Any:
    first = values[0]
    return first if all(v == first for v in values) else ", ".join(fmt(v) for v in values)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def read_group(spec: str, figures: bool = True) -> Group:
    """evidence/SPEC if it is there (one run or a group), else each comma-separated revision or experiment."""
    folders = evidence.runs(spec)
    if folders is not None:
        sides = [read_side(spec if len(folders) == 1 else f"{spec}/{f.name}", evidence.folder_reader(f), figures=False)
                 for f in folders]
        return Group(spec, sides)
    revs = [r for r in spec.split(",") if r]
    if not revs:
        raise ReviewError(f"{spec!r}: not a revision, an experiment or evidence")
    sides = []
    for rev in revs:
        try:
            sides.append(read_side(rev, evidence.reader(rev), figures))
        except evidence.EvidenceError as e:
            raise ReviewError(str(e)) from None
    return Group(spec, sides)


def read_side(rev: str, source: tuple | None = None, figures: bool = True) -> Side:
    """The params, metrics, test per-image matrices and (unless `figures` is False) figures of one run, read
    through `source` = (params, read) from offroad.evidence (default: the revision `rev` through DVC)."""
    params, read = source or evidence.reader(rev)
    stale = evidence.stale_stages() if rev == WORKSPACE else []
    if stale:
        warn(f"workspace: the outputs of {', '.join(stale)} are not those of its params.yaml, code or data "
             "(`dvc status`): its scores are the last run's; run `dvc repro` to review what the workspace says")
    train, evaluation = (_json(read(p), f"{rev}:{p}") for p in (artifacts.TRAIN_METRICS, artifacts.EVAL_METRICS))
    if evaluation and HEADLINE not in evaluation:
        raise ReviewError(f"{rev}: {artifacts.EVAL_METRICS} has no {HEADLINE} split (it predates the held-out test "
                          f"split); rerun its evaluation with this code")
    class_names = [c["name"] for c in params.get("data", {}).get("classes", [])]
    path = artifacts.PER_IMAGE[HEADLINE]
    text = read(path)
    per_image = None if text is None else artifacts.parse_per_image(text, class_names, f"{rev}:{path}")
    if per_image is not None:
        check_one_evaluation(rev, evaluation.get(HEADLINE, {}), per_image[1])
    metrics = {k: v for k, v in flatten({**train, **evaluation}).items() if ".per_class." not in k}
    fs_figures = {p: read(Path(p), "rb") for p in figure_paths()} if figures else {}
    return Side(rev, flatten(params), metrics, evaluation.get(HEADLINE, {}).get("per_class", {}), per_image,
                {p: data for p, data in fs_figures.items() if data is not None})


def check_one_evaluation(rev: str, evaluation: dict, per_image: np.ndarray) -> None:
    """The per-image matrices and evaluate.json must come from the same evaluation: not more images than it
    scored, and the same dataset scores (to evaluate.json's rounding)."""
    where = f"{rev}: {artifacts.PER_IMAGE[HEADLINE]} and {artifacts.EVAL_METRICS}"
    fix = "rerun `dvc repro evaluate`" if rev == WORKSPACE else "rerun that revision's evaluation"
    images = evaluation.get("images")
    if images is not None and (not isinstance(images, int) or isinstance(images, bool) or images < 0):
        raise ReviewError(f"{rev}: {artifacts.EVAL_METRICS}: images {images!r} is not a count; {fix}")
    if isinstance(images, int) and len(per_image) > images:
        raise ReviewError(f"{where} disagree: {len(per_image)} images against {images}; {fix}")
    if not len(per_image) and _is_number(evaluation.get("miou")):
        raise ReviewError(f"{where} disagree: no image rows against a scored evaluation; {fix}")
    recomputed = dataset_scores(per_image.sum(0)) if len(per_image) else {}
    for score in ("miou", "pixel_accuracy"):
        stored = evaluation.get(score)
        if _is_number(stored) and score in recomputed and not abs(recomputed[score] - stored) <= 10 ** -artifacts.DIGITS:
            raise ReviewError(f"{where} disagree: {score} {float(recomputed[score]):.5f} from the images against "
                              f"{stored}; they come from different evaluations (one was interrupted?); {fix}")


def same_classes(sides: list[Side | Group]) -> None:
    """Scores over different class lists cannot be compared."""
    first = sides[0]
    for side in sides[1:]:
        if side.classes != first.classes:
            raise ReviewError(f"`{first.rev}` has {len(first.classes)} classes and `{side.rev}` {len(side.classes)} "
                              f"({', '.join(sorted(set(first.classes) ^ set(side.classes))) or 'in another order'}): "
                              "their scores cannot be compared")


def _json(text: str | None, where: str) -> dict:
    try:
        found = json.loads(text) if text is not None else {}
    except ValueError as e:
        raise ReviewError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(found, dict):
        raise ReviewError(f"{where}: not a JSON object")
    return found


def figure_paths() -> list[str]:
    """The plot stage's PNGs (those a revision lacks are left out when read)."""
    return [(artifacts.FIGURES / name).as_posix() for name in artifacts.FIGURE_NAMES]


# --- the comparison --------------------------------------------------------------------------------------

def common_images(groups: list[Group]) -> tuple[list[list[np.ndarray]], int, dict[str, int]]:
    """Each group's runs' [N, K, K] matrices of the test images every run scored, in the first run's order;
    N; and how many images each run scored besides (by run, where any)."""
    runs = [run for group in groups for run in group.runs]
    for run in runs:
        if run.per_image is None:
            raise ReviewError(missing_note(run))
    index = [dict(zip(r.per_image[0], range(len(r.per_image[0])))) for r in runs]
    shared = [n for n in runs[0].per_image[0] if all(n in i for i in index)]
    if not shared:
        raise ReviewError(f"{', '.join(g.rev for g in groups)}: no {HEADLINE} image scored by all of them")
    cms = iter([r.per_image[1][[i[n] for n in shared]] for r, i in zip(runs, index)])
    extra = {r.rev: len(r.per_image[0]) - len(shared) for r in runs if len(r.per_image[0]) > len(shared)}
    return [[next(cms) for _ in group.runs] for group in groups], len(shared), extra


def missing_note(side: Side) -> str:
    produce = ("run `dvc repro evaluate`" if side.rev == WORKSPACE else
               f"rerun its evaluation with this code: `git checkout {side.rev} -- params.yaml dvc.lock && "
               "dvc checkout && dvc repro evaluate` (`dvc pull` first if its checkpoint is not in the cache), "
               "then commit the result")
    return (f"`{side.rev}` has no per-image data (`{artifacts.PER_IMAGE[HEADLINE]}`), so its scores cannot be "
            f"tested against noise. To produce it, {produce}.")


TRAINING_NOISE = ("Training noise is included: the spread of the {runs} runs around their side's mean, pooled "
                  "({df} degrees of freedom), is added to each resample as t-distributed noise on each side's mean "
                  "(offroad.bootstrap.groups_scores).")


def noise_note(groups: list[Group]) -> str:
    """What the intervals include: training noise when some side has several runs to measure it by."""
    single = [g.rev for g in groups if len(g.runs) == 1]
    if len(single) == len(groups):
        return (f"**Training noise is not included**: {', '.join(f'`{s}`' for s in single)} "
                f"{'is one run' if len(single) == 1 else 'are one run each'}, so the intervals hold the trained "
                "models fixed and measure the test images' noise only; a change of seed alone can pass them. "
                "Compare seed replicates (`-S train.seed=0,1,2`) as groups for a verdict on the recipe.")
    runs = sum(len(g.runs) for g in groups)
    assumed = f" For {', '.join(f'`{s}`' for s in single)} (one run) it is assumed the same." if single else ""
    return TRAINING_NOISE.format(runs=runs, df=runs - len(groups)) + f" Runs per side: " + \
        ", ".join(f"`{g.rev}` {len(g.runs)}" for g in groups) + "." + assumed


def level(tests: int) -> str:
    return f"{100 * (1 - (1 - bootstrap.LEVEL) / tests):.4g} %"


def fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "—"
        return f"{value:.4g}" if abs(value) >= 1000 else f"{value:.4f}".rstrip("0").rstrip(".")
    if isinstance(value, (list, dict)):
        return f"`{json.dumps(value)}`"
    return str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _change(old: Any, new: Any) -> str:
    return f"{new - old:+.4f}".rstrip("0").rstrip(".") if _is_number(old) and _is_number(new) else ""


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    escape = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    return [f"| {' | '.join(header)} |", f"|{'|'.join('---' for _ in header)}|",
            *(f"| {' | '.join(escape(c) for c in r)} |" for r in rows)]


def params_section(old: Group, new: Group) -> list[str]:
    a, b = old.params, new.params
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    if not keys:
        return ["### Params", "", "No param changed."]
    rows = [[f"`{k}`", fmt(a.get(k, "—")), fmt(b.get(k, "—"))] for k in keys]
    return ["### Params that changed", "", *md_table(["param", old.rev, new.rev], rows)]


def metrics_section(old: Group, new: Group, paired: tuple | None, resamples: int, seed: int) -> list[str]:
    notes, tested = [], {}
    if paired is None:
        notes += [missing_note(run) for group in (old, new) for run in group.runs if run.per_image is None]
    elif paired[1] < 2:
        notes.append(f"Only {paired[1]} {HEADLINE} image was scored by every run: no intervals and no verdicts (a "
                     "bootstrap over one image has no spread).")
    else:
        (old_cms, new_cms), images, extra = paired
        found = bootstrap.compare(old_cms, new_cms, resamples=resamples, seed=seed, tests=len(SCORES))
        tested = {f"{HEADLINE}.{s}": r for s, r in found.items()}
        notes.append(f"Verdicts on the {HEADLINE} split ({images} images every run scored; val chose the epoch, so "
                     f"its scores get none): bootstrap over the images, paired ({resamples} resamples, seed {seed}); "
                     f"*better* / *worse* when the whole interval of the change is above / below 0, else *within "
                     f"noise*. {len(SCORES)} verdicts, each interval at {level(len(SCORES))} (Bonferroni), so all "
                     "hold together at 95 %.")
        notes.append(noise_note([old, new]))
        if extra:
            left = ", ".join(f"{n} image(s) of `{r}`" for r, n in extra.items())
            notes.append(f"Left out, scored by one run only: {left}; the tested rows score the {images} images "
                         "every run scored.")
    a, b = old.metrics, new.metrics
    bounds = re.compile(r"_(low|high)$")
    # the other numbers, and the other values where they differ; the interval bounds are in the verdict column
    others = sorted(k for k in a.keys() | b.keys() if k not in TESTED and not bounds.search(k)
                    and (_is_number(a.get(k)) or a.get(k) != b.get(k)))
    rows = []
    for k in [*TESTED, *others]:
        x, y = a.get(k, "—"), b.get(k, "—")
        if k in tested:  # the scores of the images the interval is over
            r = tested[k]
            rows.append([f"**{k}**", fmt(r["old"]), fmt(r["new"]), _change(r["old"], r["new"]),
                         f"[{r['low']:+.4f}, {r['high']:+.4f}]", f"**{r['verdict']}**"])
        else:
            rows.append([k, fmt(x), fmt(y), _change(x, y), "", ""])
    header = ["metric", old.rev, new.rev, "change", f"{level(len(SCORES))} interval of the change", "verdict"]
    return ["### Metrics", "", *md_table(header, rows), "", *notes]


def per_class_section(old: Group, new: Group, paired: tuple | None, resamples: int, seed: int) -> list[str]:
    names = old.classes
    if paired is None or paired[1] < 2:
        return ["### Per-class IoU (test)", "", "No per-image data on one side, or one image: no per-class intervals."]
    (old_cms, new_cms), _, _ = paired
    found = bootstrap.compare(old_cms, new_cms, lambda cms: bootstrap.class_iou(cms, names), resamples, seed,
                              tests=len(names))
    rows = [[name, fmt(r["old"]), fmt(r["new"]), _change(r["old"], r["new"]),
             "" if math.isnan(r["low"]) else f"[{r['low']:+.4f}, {r['high']:+.4f}]",
             "" if math.isnan(r["old"]) or math.isnan(r["new"]) else r["verdict"]] for name, r in found.items()]
    header = ["class", old.rev, new.rev, "change", f"{level(len(names))} interval of the change", "verdict"]
    return ["### Per-class IoU (test)", "", *md_table(header, rows), "",
            f"{len(names)} verdicts, each interval at {level(len(names))} (Bonferroni); — where a class is absent "
            "from the test images."]


def figures_section(old: Group, new: Group, out: Path | None) -> list[str]:
    """Links to both sides' PNGs (a group's first run): copied beside the report (OUT_figures/{old,new}/) when it
    is written to a file."""
    links: dict[str, dict[str, str]] = {}
    for role, side in (("old", old.runs[0]), ("new", new.runs[0])):
        for path, data in side.figures.items():
            name = Path(path).name
            if out is None:
                target = path if side.rev == WORKSPACE else f"{side.rev}:{path}"
                links.setdefault(name, {})[role] = f"`{target}`"
                continue
            folder = out.parent / f"{out.stem}_figures" / role
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)
            links.setdefault(name, {})[role] = f"[{side.rev}]({folder.relative_to(out.parent).as_posix()}/{name})"
    rows = [[name, links[name].get("old", "—"), links[name].get("new", "—")] for name in sorted(links)]
    side_by_side = f"Side by side, with the curves: `dvc plots diff {old.rev} {new.rev}` (dvc_plots/index.html)."
    return ["### Figures", "", *(md_table(["figure", old.rev, new.rev], rows) if rows else ["No figures."]), "",
            side_by_side]


def report(old: Group, new: Group, resamples: int = bootstrap.RESAMPLES, seed: int = bootstrap.SEED,
           out: Path | None = None) -> str:
    same_classes([old, new])
    missing = any(run.per_image is None for group in (old, new) for run in group.runs)
    paired = None
    if not missing:
        cms, images, extra = common_images([old, new])
        paired = (tuple(cms), images, extra)
    sections = [[f"## Review: `{old.rev}` → `{new.rev}`"], params_section(old, new),
                metrics_section(old, new, paired, resamples, seed),
                per_class_section(old, new, paired, resamples, seed), figures_section(old, new, out)]
    return "\n\n".join("\n".join(lines) for lines in sections) + "\n"


def verdicts(text: str) -> list[str]:
    """The metric verdicts of a report, for --fail-on-worse."""
    return re.findall(r"\| \*\*(better|worse|within noise)\*\* \|", text)


def check_report_out(out: Path | None, force: bool, figures: bool = True) -> None:
    """A report is never written over a folder, nor, without --force, over a pipeline file or one git tracks
    (nor its figures folder, OUT_figures/, over either)."""
    if out is None:
        return
    if out.is_dir():
        raise ReviewError(f"--out {out} is a folder; give a file name such as {out / 'report.md'}")
    targets = [out, out.parent / f"{out.stem}_figures"] if figures else [out]
    for target in targets:
        reason = guard.reason(target)
        if reason and not force:
            raise ReviewError(f"--out {out}: would overwrite {target} ({reason}); choose another file, or add --force")


def whole_number(low: int, high: int):
    """An argparse type: an int in low..high, or one line that says what is wrong."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is outside {low}..{high}")
        return value
    return parse


def add_report_args(parser: argparse.ArgumentParser) -> None:
    """The options review and ablation share: resampling and where the markdown goes."""
    parser.add_argument("--resamples", type=whole_number(1, MAX_RESAMPLES), default=bootstrap.RESAMPLES,
                        help=f"bootstrap resamples of the images (1..{MAX_RESAMPLES}, default {bootstrap.RESAMPLES})")
    parser.add_argument("--seed", type=whole_number(0, 2**32 - 1), default=bootstrap.SEED,
                        help=f"seed of the resampling: the same seed gives the same intervals (default {bootstrap.SEED})")
    parser.add_argument("--force", action="store_true",
                        help="allow --out over a file git tracks or the pipeline reads or writes")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m offroad.review", description=__doc__.split("\n\n")[0])
    parser.add_argument("old", nargs="?", default="HEAD",
                        help="evidence name, revision or experiment, or several joined by commas (default HEAD)")
    parser.add_argument("new", nargs="?", default=WORKSPACE, help="the same, or `workspace` (default)")
    parser.add_argument("--out", type=Path, help="write the markdown here (and the figures beside it), not to stdout")
    parser.add_argument("--fail-on-worse", action="store_true",
                        help="exit 1 when any metric's verdict is worse (for CI gates)")
    add_report_args(parser)
    args = parser.parse_args(argv)
    check_report_out(args.out, args.force)
    text = report(read_group(args.old), read_group(args.new), args.resamples, args.seed, args.out)
    emit(text, args.out, "review")
    if args.fail_on_worse and "worse" in verdicts(text):
        raise SystemExit(1)


def emit(text: str, out: Path | None, command: str) -> None:
    """Write a command's markdown to `out`, or print it when there is none."""
    if out:
        atomic.write_text(out, text)
        print(f"{command}: wrote {out}")
    else:
        print(text, end="")


def cli() -> None:
    """The console script."""
    run_cli(main, then="run the same command again")


if __name__ == "__main__":
    cli()
