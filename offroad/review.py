"""A review report: what changed between two revisions or experiments, and whether the scores moved beyond noise.

    python -m offroad.review [OLD] [NEW] [--out report.md] [--resamples 1000] [--seed 0]

OLD and NEW are git revisions, branches, tags or DVC experiment names; `workspace` is the files on disk
(defaults: HEAD against the workspace). The markdown lists the params that changed, each metric old -> new
with a verdict (better / worse / within noise) from a paired bootstrap over the val images both sides scored
(offroad.bootstrap, on metrics/per_image_confusion.csv), the per-class IoU of both, and both sides' figures.
Other revisions are read through DVC's Python API (dvc.api), the workspace from disk.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from offroad import artifacts, atomic, bootstrap
from offroad.errors import PipelineError, run_cli
from offroad.metrics import SCORES, dataset_scores

WORKSPACE = "workspace"
MAX_RESAMPLES = 100_000  # each resample is an [N] row of draw counts and a [K, K] matrix per side


class ReviewError(PipelineError):
    pass


@dataclass
class Side:
    rev: str
    params: dict[str, Any]  # flat: "optimizer.lr" -> value
    metrics: dict[str, Any]  # flat, from metrics/train.json and metrics/evaluate.json (per_class left out): {} if none
    per_class: dict[str, dict]  # evaluate.json's per_class
    per_image: tuple[list[str], np.ndarray] | None  # image names and [N, K, K] counts; None when not there
    figures: dict[str, bytes]  # plots/images/NAME.png -> bytes

    @property
    def classes(self) -> list[str]:
        return [c.get("name") for c in self.params.get("data.classes", []) if isinstance(c, dict)]


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def read_side(rev: str, figures: bool = True) -> Side:
    """The params, metrics, per-image matrices and (unless `figures` is False) figures of `rev` or the workspace."""
    import dvc.api  # noqa: PLC0415 (slow to import; only this command needs it)

    at = None if rev == WORKSPACE else rev
    try:
        params = dvc.api.params_show(rev=at)
        fs = None if at is None else dvc.api.DVCFileSystem(rev=at)
    except Exception as e:  # dvc raises its own types for an unknown revision, a missing repo, bad files
        raise ReviewError(f"{rev}: cannot read its params and metrics through dvc ({type(e).__name__}: {e})") from None

    def read(path: Path, mode: str = "r") -> Any:
        try:
            if fs is None:
                return path.read_text() if mode == "r" else path.read_bytes()
            with fs.open(path.as_posix(), mode) as f:
                return f.read()
        except (FileNotFoundError, IsADirectoryError):
            return None

    train, evaluation = (_json(read(p), f"{rev}:{p}") for p in (artifacts.TRAIN_METRICS, artifacts.EVAL_METRICS))
    class_names = [c["name"] for c in params.get("data", {}).get("classes", [])]
    text = read(artifacts.PER_IMAGE)
    per_image = None if text is None else artifacts.parse_per_image(text, class_names, f"{rev}:{artifacts.PER_IMAGE}")
    if per_image is not None:
        check_one_evaluation(rev, evaluation, per_image[1])
    metrics = {k: v for k, v in flatten({**train, **evaluation}).items() if not k.startswith("per_class.")}
    return Side(rev, flatten(params), metrics, evaluation.get("per_class", {}), per_image,
                {p: read(Path(p), "rb") for p in figure_paths(fs)} if figures else {})


def check_one_evaluation(rev: str, evaluation: dict, per_image: np.ndarray) -> None:
    """The per-image matrices and evaluate.json must come from the same evaluation: not more images than it
    scored, and the same dataset scores (to evaluate.json's rounding)."""
    where = f"{rev}: {artifacts.PER_IMAGE} and {artifacts.EVAL_METRICS}"
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


def same_classes(sides: list[Side]) -> None:
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


def figure_paths(fs) -> list[str]:
    folder = artifacts.FIGURES
    if fs is None:
        return sorted(p.as_posix() for p in folder.glob("*.png"))
    try:
        listed = fs.ls(folder.as_posix(), detail=False)
    except FileNotFoundError:
        return []
    return sorted(p.lstrip("/") for p in listed if p.endswith(".png"))


# --- the comparison --------------------------------------------------------------------------------------

def pair_images(old: Side, new: Side) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Both sides' matrices of the images both scored, in OLD's order; and how many each has besides."""
    (old_names, old_cms), (new_names, new_cms) = old.per_image, new.per_image
    row = {name: i for i, name in enumerate(new_names)}
    common = [i for i, name in enumerate(old_names) if name in row]
    pairs = np.array([row[old_names[i]] for i in common], dtype=np.int64)
    return old_cms[common], new_cms[pairs], len(old_names) - len(common), len(new_names) - len(common)


def missing_note(side: Side) -> str:
    produce = ("run `dvc repro evaluate`" if side.rev == WORKSPACE else
               f"rerun its evaluation with this code: `git checkout {side.rev} -- params.yaml dvc.lock && "
               "dvc checkout && dvc repro evaluate` (`dvc pull` first if its checkpoint is not in the cache), "
               "then commit the result")
    return (f"`{side.rev}` has no per-image data (`{artifacts.PER_IMAGE}`), so its scores cannot be tested "
            f"against noise. To produce it, {produce}.")


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


def params_section(old: Side, new: Side) -> list[str]:
    keys = sorted(k for k in old.params.keys() | new.params.keys() if old.params.get(k) != new.params.get(k))
    if not keys:
        return ["### Params", "", "No param changed."]
    rows = [[f"`{k}`", fmt(old.params.get(k, "—")), fmt(new.params.get(k, "—"))] for k in keys]
    return ["### Params that changed", "", *md_table(["param", old.rev, new.rev], rows)]


def metrics_section(old: Side, new: Side, resamples: int, seed: int) -> list[str]:
    notes, tested = [], {}
    for side in (old, new):
        if side.per_image is None:
            notes.append(missing_note(side))
    if not notes:
        old_cms, new_cms, only_old, only_new = pair_images(old, new)
        if len(old_cms) == 0:
            notes.append(f"`{old.rev}` and `{new.rev}` share no val image: the scores cannot be paired.")
        else:
            tested = bootstrap.paired(old_cms, new_cms, resamples, seed)
            notes.append(f"Verdicts: paired bootstrap over the {len(old_cms)} val images both sides scored "
                         f"({resamples} resamples of the images, seed {seed}); *better* / *worse* when the whole "
                         "95 % interval of the change is above / below 0, else *within noise*.")
            if only_old or only_new:
                notes.append(f"Left out, scored by one side only: {only_old} image(s) of `{old.rev}`, "
                             f"{only_new} of `{new.rev}`.")
    bounds = re.compile(r"_(low|high)$")
    # the other numbers, and the other values where they differ; the interval bounds are in the verdict column
    others = sorted(k for k in old.metrics.keys() | new.metrics.keys()
                    if k not in SCORES and not bounds.search(k)
                    and (_is_number(old.metrics.get(k)) or old.metrics.get(k) != new.metrics.get(k)))
    keys = [*SCORES, *others]
    rows = []
    for k in keys:
        a, b = old.metrics.get(k, "—"), new.metrics.get(k, "—")
        if k in tested:
            t = tested[k]
            rows.append([f"**{k}**", fmt(a), fmt(b), _change(a, b), f"[{t['low']:+.4f}, {t['high']:+.4f}]",
                         f"**{t['verdict']}**"])
        else:
            rows.append([k, fmt(a), fmt(b), _change(a, b), "", ""])
    header = ["metric", old.rev, new.rev, "change", "95 % interval of the change", "verdict"]
    return ["### Metrics", "", *md_table(header, rows), "", *notes]


def per_class_section(old: Side, new: Side) -> list[str]:
    names = list(dict.fromkeys([*old.per_class, *new.per_class]))
    rows = []
    for name in names:
        a, b = (side.per_class.get(name, {}).get("iou") for side in (old, new))
        rows.append([name, fmt(a) if a is not None else "—", fmt(b) if b is not None else "—",
                     _change(a, b) if a is not None and b is not None else ""])
    return ["### Per-class IoU", "", *md_table(["class", old.rev, new.rev, "change"], rows)]


def figures_section(old: Side, new: Side, out: Path | None) -> list[str]:
    """Links to both sides' PNGs: copied beside the report (OUT_figures/{old,new}/) when it is written to a file."""
    links: dict[str, dict[str, str]] = {}
    for role, side in (("old", old), ("new", new)):
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


def report(old: Side, new: Side, resamples: int = bootstrap.RESAMPLES, seed: int = bootstrap.SEED,
           out: Path | None = None) -> str:
    same_classes([old, new])
    sections = [[f"## Review: `{old.rev}` → `{new.rev}`"], params_section(old, new),
                metrics_section(old, new, resamples, seed), per_class_section(old, new),
                figures_section(old, new, out)]
    return "\n\n".join("\n".join(lines) for lines in sections) + "\n"


def pipeline_paths(dvc_yaml: Path = Path("dvc.yaml")) -> set[Path]:
    """The files and folders the pipeline reads or writes: dvc.yaml's deps, outs, metrics and plots, the
    params, dvc.yaml and dvc.lock."""
    paths = {Path("params.yaml"), dvc_yaml, dvc_yaml.with_suffix(".lock")}
    try:
        spec = yaml.safe_load(dvc_yaml.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return paths
    names = list(spec.get("metrics", []))
    for plot in spec.get("plots", []):  # a path, or {title: {y: {path: columns}}}
        names += [y for cfg in plot.values() for y in cfg.get("y", {})] if isinstance(plot, dict) else [plot]
    for stage in (spec.get("stages") or {}).values():
        for entry in [*stage.get("deps", []), *stage.get("outs", [])]:
            names.append(next(iter(entry)) if isinstance(entry, dict) else entry)
    return paths | {Path(n) for n in names if isinstance(n, str) and "${" not in n}  # templated ones: outs too


def _tracked(path: Path) -> bool:
    try:
        found = subprocess.run(["git", "ls-files", "--error-unmatch", "--", str(path)], capture_output=True)
    except OSError:  # no git
        return False
    return found.returncode == 0


def check_report_out(out: Path | None, force: bool, figures: bool = True) -> None:
    """A report is never written over a folder, nor, without --force, over a pipeline file or one git tracks
    (nor its figures folder, OUT_figures/, over either)."""
    if out is None:
        return
    if out.is_dir():
        raise ReviewError(f"--out {out} is a folder; give a file name such as {out / 'report.md'}")
    targets = [out, out.parent / f"{out.stem}_figures"] if figures else [out]
    protected = {p.resolve() for p in pipeline_paths()}
    for target in targets:
        resolved = target.resolve()
        pipeline = any(resolved == p or p in resolved.parents for p in protected)
        reason = "the pipeline reads or writes it" if pipeline else \
            "git tracks it" if target.exists() and _tracked(target) else None
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
    parser.add_argument("old", nargs="?", default="HEAD", help="revision or experiment (default HEAD)")
    parser.add_argument("new", nargs="?", default=WORKSPACE, help="revision, experiment or `workspace` (default)")
    parser.add_argument("--out", type=Path, help="write the markdown here (and the figures beside it), not to stdout")
    add_report_args(parser)
    args = parser.parse_args(argv)
    check_report_out(args.out, args.force)
    text = report(read_side(args.old), read_side(args.new), args.resamples, args.seed, args.out)
    emit(text, args.out, "review")


def emit(text: str, out: Path | None, command: str) -> None:
    """Write a command's markdown to `out`, or print it when there is none."""
    if out:
        atomic.write_text(out, text)
        print(f"{command}: wrote {out}")
    else:
        print(text, end="")


if __name__ == "__main__":
    run_cli(main, then="run the same command again")
