"""Atomic writes: every file a stage produces appears complete or not at all."""
from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch

TMP_SUFFIX = ".tmp"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary sibling folder; swap it in for `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(path)
    tmp, old = (path.with_name(f".{path.name}.{os.getpid()}{end}") for end in (".tmpdir", ".old"))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            path.rename(old)
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def save_torch(path: str | Path, obj: Any) -> None:
    # Through a file object: given a path, torch.save names the archive inside after the (per-process)
    # temporary file, so the same object would give different bytes and DVC hashes on every run.
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def _remove_orphans(path: Path) -> None:
    """Delete the temporaries of `path` left by writers that were killed (a live writer's are kept)."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*"):
        pid, _, end = tmp.name[len(path.name) + 2:].partition(".")
        if pid.isdigit() and end in ("tmp", "tmpdir", "old") and not _running(int(pid)):
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        pass
    return True

