"""Evidence: the results of a run, committed under evidence/ so that reviews work on any clone, offline.

    python -m offroad.evidence OUT [REV ...] [--force]

Writes evidence/OUT from the workspace (no REV), from one revision or experiment, or, given several, one
folder per run, evidence/OUT/seedN (the runs' train.seed). A run's folder holds the files of the repository
that a review reads, at the same paths: params.yaml (all params), dvclive/metrics.json, metrics/evaluate.json,
metrics/per_image/{val,test}.csv, metrics/run/train.json, DVCLive's per-epoch series dvclive/plots/metrics/,
and source.json (the revision and commit it came from). `offroad.review` and `offroad.ablation` read evidence/NAME as a side,
before any experiment or revision of that name.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
from pathlib import Path

import yaml

from offroad import artifacts, atomic
from offroad.errors import PipelineError, run_cli

EVIDENCE = Path("evidence")
NAME = re.compile(r"[A-Za-z0-9._-]+")
WORKSPACE = "workspace"
FILES = (artifacts.TRAIN_METRICS, artifacts.EVAL_METRICS, *artifacts.PER_IMAGE.values(), artifacts.TRAIN_RUN,
         *artifacts.HISTORY_FILES)
PARAMS = Path("params.yaml")
SOURCE = Path("source.json")


class EvidenceError(PipelineError):
    pass


def runs(name: str, root: Path = EVIDENCE) -> list[Path] | None:
    """The run folders of evidence/NAME: itself when it is one run, its subfolders when it is a group; None
    when there is no such evidence."""
    folder = root / name
    if (folder / PARAMS).is_file():
        return [folder]
    found = sorted(p.parent for p in folder.glob(f"*/{PARAMS}")) if folder.is_dir() else []
    return found or None


def reader(rev: str):
    """(params dict, read(path, mode) -> str | bytes | None) of a revision, an experiment or the workspace."""
    if rev == WORKSPACE:  # the files on disk; no DVC needed (a machine without git or dvc can save evidence)
        return folder_reader(Path("."))
    import dvc.api  # noqa: PLC0415 (slow to import; only reports need it)

    try:
        params = dvc.api.params_show(rev=rev)
        fs = dvc.api.DVCFileSystem(rev=rev)
    except Exception as e:  # dvc raises its own types for an unknown revision, a missing repo, bad files
        raise EvidenceError(unknown(rev, e)) from None

    def read(path: Path, mode: str = "r"):
        try:
            with fs.open(path.as_posix(), mode) as f:
                return f.read()
        except (FileNotFoundError, IsADirectoryError):
            return None
    return params, read


def folder_reader(folder: Path):
    """The same for a run folder of evidence/."""
    try:
        params = yaml.safe_load((folder / PARAMS).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise EvidenceError(f"{folder / PARAMS}: cannot be read ({e})") from None
    if not isinstance(params, dict):
        raise EvidenceError(f"{folder / PARAMS}: not a mapping of params")

    def read(path: Path, mode: str = "r"):
        target = folder / path
        if not target.is_file():
            return None
        return target.read_text() if mode == "r" else target.read_bytes()
    return params, read


def unknown(rev: str, error: Exception) -> str:
    """One line for a side that is neither evidence nor a revision DVC can read: what is missing and how to
    make it."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    if "unknown" not in text.lower() and "revision" not in text.lower():
        return f"{rev}: cannot read its params and metrics through dvc ({type(error).__name__}: {text})"
    args = Path("experiments") / f"{rev}.args"
    ablation = Path("experiments/ablation") / f"{rev.removeprefix('no-')}.args"
    make = (f"`dvc exp run -n {rev} $(cat {args})`" if args.is_file() else
            f"`dvc exp run -n {rev} $(cat {ablation})`" if rev.startswith("no-") and ablation.is_file() else
            f"`dvc exp run -n {rev} -S ...`")
    return (f"{rev}: no evidence/{rev}/ and no git revision or experiment of that name (experiments are local: "
            f"a clone has none). Make it with {make}, or fetch it with `dvc exp pull REMOTE {rev}`")


def source_commit(rev: str) -> str | None:
    try:
        found = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{'HEAD' if rev == WORKSPACE else rev}^{{commit}}"],
                               capture_output=True, text=True)
    except OSError:
        return None
    return found.stdout.strip() or None


def stale_stages() -> list[str]:
    """The stages whose outputs in the workspace are not those of its params, code and data (`dvc status`);
    none outside a DVC project (a copy that ran the stages by hand)."""
    if not Path(".dvc").is_dir():
        return []
    from dvc.repo import Repo  # noqa: PLC0415 (slow to import)

    try:
        with Repo(".") as repo:
            return list(repo.status())
    except Exception as e:  # noqa: BLE001  dvc raises its own types for a broken dvc.yaml or lock
        raise EvidenceError(f"workspace: `dvc status` failed ({type(e).__name__}: {e})") from None


def save(out: Path, rev: str) -> None:
    """Write one run's evidence folder from `rev`, whole or not at all."""
    stale = stale_stages() if rev == WORKSPACE else []
    if stale:
        raise EvidenceError(f"workspace: the outputs of {', '.join(stale)} are not those of its params.yaml, code "
                            "or data (`dvc status`); run `dvc repro` first, or give a committed revision")
    params, read = reader(rev)
    missing = [p.as_posix() for p in FILES[:4] if read(p) is None]
    if missing:
        raise EvidenceError(f"{rev}: has no {', '.join(missing)}; run its pipeline first (`dvc repro`)")
    with atomic.atomic_dir(out) as tmp:
        (tmp / PARAMS).write_text(yaml.safe_dump(params, sort_keys=False))
        for path in FILES:
            text = read(path)
            if text is not None:
                (tmp / path).parent.mkdir(parents=True, exist_ok=True)
                (tmp / path).write_text(text)
        (tmp / SOURCE).write_text(json.dumps({"rev": rev, "commit": source_commit(rev)}, indent=2) + "\n")


def run_folder(out: Path, rev: str, many: bool) -> Path:
    if not many:
        return out
    seed = reader(rev)[0].get("train", {}).get("seed")
    return out / f"seed{seed}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m offroad.evidence", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="the evidence name: writes evidence/OUT (one run) or evidence/OUT/seedN (several)")
    parser.add_argument("revs", nargs="*", default=[WORKSPACE],
                        help="revisions or experiments (default: the workspace)")
    parser.add_argument("--force", action="store_true", help="replace evidence that is already there")
    args = parser.parse_args(argv)
    if not all(NAME.fullmatch(part) and set(part) != {"."} for part in args.out.split("/")):
        raise EvidenceError(f"evidence name {args.out!r}: give a plain name (letters, digits, '.', '_', '-', and '/' "
                            f"between names), it becomes {EVIDENCE}/NAME")
    out = EVIDENCE / args.out
    targets = [run_folder(out, rev, len(args.revs) > 1) for rev in args.revs]
    if len(set(targets)) < len(targets):
        raise EvidenceError(f"{', '.join(args.revs)}: two of them have the same train.seed; give them one at a time")
    for target in targets:
        if target.exists() and not args.force:
            raise EvidenceError(f"{target} is already there; add --force to replace it")
    for rev, target in zip(args.revs, targets):
        save(target, rev)
        print(f"evidence: {rev} -> {target}")


def cli() -> None:
    """The console script."""
    run_cli(main, then="run the same command again")


if __name__ == "__main__":
    cli()
