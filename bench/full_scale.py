"""Full-scale rehearsal: the stages at the real dataset's size, with wall time, cores used, peak RSS and disk.

    python -m bench.full_scale [--train 2857] [--val 317] [--workdir DIR] [-S key=value ...]

In a scratch copy of the project (--workdir, default a temporary folder), with params.yaml's synthetic split
sizes set to --train / --val (the real dataset's 2857 / 317 by default) and any `-S key=value` overrides, runs
synthesize, prepare, class_weights, one Phase 2 train epoch and one Phase 1 train epoch
(experiments/phase1.args), each as its own `python -m stages.NAME` process. Prints a markdown table: wall
seconds, images/s, cores used (CPU seconds / wall seconds), the process tree's peak RSS, the same less the
in-memory feature cache (train), and the disk its outputs take; then the 30-epoch Phase 2 time it projects.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from offroad import artifacts
from offroad.config import PATCH, VIT_ARCHS, ParamsError, apply_overrides, load_params, parse_override, read_overrides
from offroad.runtime import Run

REPO = Path(__file__).resolve().parents[1]
COPIED = ("stages", "offroad", "params.yaml")
PHASE1 = REPO / "experiments/phase1.args"
GB = 1024 ** 3


def override(path: Path, overrides: dict[str, Any]) -> None:
    """Set dotted keys in the params file at `path` (offroad.config.apply_overrides)."""
    try:
        raw = apply_overrides(yaml.safe_load(path.read_text()), overrides, "params.yaml")
    except ParamsError as e:
        raise SystemExit(f"full_scale: {e}") from None
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def run_stage(stage: str, cwd: Path, log: Path) -> dict:
    """Run `python -m stages.STAGE` in `cwd`: wall and CPU seconds, and the peak RSS of it and its children."""
    start = time.perf_counter()
    with log.open("a") as out:
        proc = subprocess.Popen([sys.executable, "-m", f"stages.{stage}"], cwd=cwd, stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, "TQDM_DISABLE": "1"})
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"full_scale: stage {stage} failed; its output is in {log}")
    # ru_maxrss (KiB on Linux) covers the process and the children it waited for (decoding workers)
    return {"wall": wall, "cores": (usage.ru_utime + usage.ru_stime) / wall, "rss": usage.ru_maxrss * 1024 / GB}


def disk(paths: list[Path]) -> float:
    files = [f for p in paths for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file()]
    return sum(f.stat().st_size for f in files) / GB


def feature_cache_gb(params, cached_images: int) -> float:
    """Bytes of the train stage's in-memory feature cache: tokens x width per image, in the autocast dtype."""
    width, height = params.data.image_size
    dim = VIT_ARCHS[params.model.backbone.removeprefix("dinov2_").removesuffix("_reg")][0]
    dtype_bytes = 2 if Run.from_params(params, torch.device("cpu")).amp else 4
    return cached_images * (width // PATCH) * (height // PATCH) * dim * dtype_bytes / GB


def rehearse(work: Path, train: int, val: int, test: int, overrides: dict[str, Any]) -> list[dict]:
    for name in COPIED:
        src = REPO / name
        (shutil.copytree(src, work / name, ignore=shutil.ignore_patterns("__pycache__")) if src.is_dir()
         else shutil.copy2(src, work / name))
    params_file = work / "params.yaml"
    override(params_file, {**overrides, "synthetic.train": train, "synthetic.val": val,
                            "synthetic.test": test})  # the sizes win
    base = params_file.read_text()
    log = work / "rehearsal.log"
    rows = []
    steps = [("synthesize", "synthesize", {}, train + val + test, [artifacts.SYNTHETIC]),
             ("prepare", "prepare", {}, train + val + test, [artifacts.PREPARED]),
             ("class_weights", "class_weights", {}, train, [artifacts.CLASS_WEIGHTS]),
             ("train: 1 Phase 2 epoch", "train", {"train.epochs": 1}, train, [Path("models")]),
             ("train: 1 Phase 1 epoch", "train", {**read_overrides(PHASE1), "train.epochs": 1}, train,
              [Path("models")])]
    for label, stage, extra, images, outs in steps:
        params_file.write_text(base)
        override(params_file, extra)
        old = os.getcwd()
        os.chdir(work)
        try:
            params = load_params()
        finally:
            os.chdir(old)
        row = {"step": label, **run_stage(stage, work, log), "images": images,
               "disk": disk([work / p for p in outs]), "cache": None}
        if stage == "train":
            row["cache"] = feature_cache_gb(params, val + (0 if params.augment.enabled else train))
            row["train_seconds"] = json.loads((work / artifacts.TRAIN_RUN).read_text())["train_seconds"]
        rows.append(row)
        print(f"full_scale: {label}: {row['wall']:.0f} s", file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict], cpu: str) -> str:
    lines = [f"CPU: {cpu}, {os.cpu_count()} cores", "",
             "| step | wall s | images/s | cores used | peak RSS GB | RSS less feature cache GB | disk GB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        less = f"{r['rss'] - r['cache']:.2f}" if r["cache"] is not None else "—"
        lines.append(f"| {r['step']} | {r['wall']:.0f} | {r['images'] / r['wall']:.1f} | {r['cores']:.2f} | "
                     f"{r['rss']:.2f} | {less} | {r['disk']:.2f} |")
    phase2 = next(r for r in rows if "Phase 2" in r["step"])
    lines += ["", f"Projected 30-epoch Phase 2 train stage: {30 * phase2['wall'] / 3600:.1f} h "
                  f"(30 x this epoch's {phase2['wall']:.0f} s; an upper bound: the val features are computed "
                  "once, not every epoch)"]
    return "\n".join(lines) + "\n"


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return "unknown"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m bench.full_scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=2857)
    parser.add_argument("--val", type=int, default=317)
    parser.add_argument("--test", type=int, default=1002, help="test images (default 1002, the real test download's)")
    parser.add_argument("--workdir", type=Path, help="scratch folder, kept (default: a temporary one, removed)")
    parser.add_argument("-S", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        overrides = dict(parse_override(o) for o in args.overrides)
    except ParamsError as e:
        parser.error(str(e))
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=False)
        rows = rehearse(args.workdir, args.train, args.val, args.test, overrides)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            rows = rehearse(Path(tmp), args.train, args.val, args.test, overrides)
    text = table(rows, cpu_model())
    print(text, end="")
    return text


if __name__ == "__main__":
    main()
