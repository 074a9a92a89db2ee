"""The ablation grid without git or DVC, for a machine that has neither (a lent GPU box): each arm x seed is
trained and evaluated in its own copy of the project, and its evidence written to evidence/ARM/seedN.

    python -m bench.grid [--seeds 0 1 2] [--parallel 4] [--budget 480] [--arms phase1 phase2 no-adamw ...]
                         [--save-as NAME]

Arms: phase1 (experiments/phase1.args), phase2 (params.yaml) and no-NAME (experiments/ablation/NAME.args).
The data stages run once, in the project. Runs go in order of seed (all arms of seed 0 first) and no run
starts after --budget seconds. On a machine with DVC, queue the same grid instead (README "Ablation").
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from offroad.config import apply_overrides, read_overrides

ARGS = {"phase1": Path("experiments/phase1.args"), "phase2": None,
        **{f"no-{p.stem}": p for p in sorted(Path("experiments/ablation").glob("*.args"))}}
CODE = ("offroad", "stages", "params.yaml", "experiments")


def stage(*names: str, cwd: Path | str = ".") -> None:
    for name in names:
        subprocess.run([sys.executable, "-m", f"stages.{name}"], cwd=cwd, check=True,
                       stdout=subprocess.DEVNULL if name != "train" else None)


def run_one(arm: str, seed: int, work: Path, name: str) -> str:
    """Train and evaluate one arm with one seed in a copy of the project; write its evidence."""
    folder = work / f"{arm}-{seed}"
    for name in CODE:
        (shutil.copytree if Path(name).is_dir() else shutil.copy)(name, folder / name)
    (folder / "data").mkdir()
    for name in ("prepared", "class_weights.json"):
        (folder / "data" / name).symlink_to(Path("data", name).resolve())
    params = yaml.safe_load(Path("params.yaml").read_text())
    overrides = {**(read_overrides(ARGS[arm]) if ARGS[arm] else {}), "train.seed": seed}
    (folder / "params.yaml").write_text(yaml.safe_dump(apply_overrides(params, overrides, "params.yaml"),
                                                       sort_keys=False))
    start = time.perf_counter()
    with open(folder / "log.txt", "w") as log:
        for step in ("train", "evaluate"):
            subprocess.run([sys.executable, "-m", f"stages.{step}"], cwd=folder, check=True, stdout=log,
                           stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")])})
        subprocess.run([sys.executable, "-m", "offroad.evidence", f"{name}/seed{seed}", "--force"], cwd=folder,
                       check=True, stdout=log, stderr=subprocess.STDOUT)
    if os.environ.get("GRID_LOGS"):
        shutil.copy(folder / "log.txt", Path(os.environ["GRID_LOGS"]) / f"{arm}-{seed}.txt")
    shutil.copytree(folder / "evidence" / name / f"seed{seed}", Path("evidence") / name / f"seed{seed}",
                    dirs_exist_ok=True)
    return f"{arm} seed {seed}: {time.perf_counter() - start:.0f} s"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.grid", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", nargs="+", default=list(ARGS), choices=list(ARGS), help="default: all")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="train.seed values (default 0 1 2)")
    parser.add_argument("--parallel", type=int, default=4, help="runs at a time (default 4)")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds after which no run starts")
    parser.add_argument("--save-as", help="evidence name for the runs (default: the arm's); one arm only")
    args = parser.parse_args()
    if args.save_as and len(args.arms) != 1:
        parser.error("--save-as takes one arm")
    begin = time.perf_counter()
    stage("synthesize", "prepare", "class_weights")
    print(f"data: {time.perf_counter() - begin:.0f} s", flush=True)
    grid = [(arm, seed) for seed in args.seeds for arm in args.arms]

    def guarded(arm: str, seed: int, work: Path) -> str:
        if time.perf_counter() - begin > args.budget:
            return f"{arm} seed {seed}: not started (budget)"
        try:
            return run_one(arm, seed, work, args.save_as or arm)
        except subprocess.CalledProcessError as e:
            return f"{arm} seed {seed}: failed ({e})"

    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.parallel) as pool:
        for line in pool.map(lambda job: guarded(*job, Path(tmp)), grid):
            print(line, flush=True)
    print(f"grid: {time.perf_counter() - begin:.0f} s", flush=True)


if __name__ == "__main__":
    main()
