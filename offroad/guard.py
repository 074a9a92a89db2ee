"""What a report or a prediction must not overwrite: the pipeline's files (dvc.yaml's deps, outputs, metrics
and plots, params.yaml, dvc.yaml, dvc.lock) and files git tracks. `--force` lets the user do it anyway."""
from __future__ import annotations

import subprocess
from pathlib import Path

import yaml


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


def tracked(path: Path) -> bool:
    try:
        found = subprocess.run(["git", "ls-files", "--error-unmatch", "--", str(path)], capture_output=True)
    except OSError:  # no git
        return False
    return found.returncode == 0


def reason(target: Path) -> str | None:
    """Why writing `target` would overwrite what it must not, or None: it is, or is inside, a pipeline path
    (a file or an output folder such as plots/images), or an existing file git tracks."""
    resolved = target.resolve()
    if any(resolved == p or p in resolved.parents for p in (q.resolve() for q in pipeline_paths())):
        return "the pipeline reads or writes it"
    return "git tracks it" if target.exists() and tracked(target) else None
