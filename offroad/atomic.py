"""Atomic writes: every file a stage produces appears complete or not at all, and with `together` a stage's
files as one set."""
from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch

from offroad.errors import PipelineError

TMP_SUFFIX = ".tmp"
_held: list[tuple[Path, Path]] | None = None  # (temporary, path) swaps that `together` holds back


class WriteError(PipelineError):
    pass


@contextlib.contextmanager
def _reported(path: Path, *temporaries: Path) -> Iterator[None]:
    """An OSError about `path`, a folder above it or its `temporaries` (or about no file: a write to an open
    file) becomes a WriteError naming `path` and the cause; other errors pass unchanged."""
    try:
        yield
    except OSError as e:
        f = Path(os.fsdecode(e.filename)) if e.filename is not None else None
        if f is not None and f not in (path, *path.parents) and not any(t == f or t in f.parents for t in temporaries):
            raise
        raise WriteError(f"{path}: cannot write ({e.strerror or e})") from None


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; rename it over `path` only if the block succeeds (inside
    `together`: once the whole set succeeded)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")
    with _reported(path, tmp):
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_orphans(path)
        held = False
        try:
            yield tmp
            if _held is None:
                os.replace(tmp, path)
            else:
                _held.append((tmp, path))
                held = True
        finally:
            if not held:
                tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def together() -> Iterator[None]:
    """The files and folders written inside the block replace their paths only once all of them are written: a
    failure, a full disk or an interrupt inside leaves every earlier one as it was. The swaps then follow each
    other at once."""
    global _held
    outer, _held = _held, []
    try:
        yield
        for tmp, path in _held:
            with _reported(path, tmp):
                _swap(tmp, path)
    finally:
        for tmp, _ in _held:
            _remove(tmp)
        _held = outer


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary sibling folder; swap it in for `path` only if the block succeeds (inside
    `together`: once the whole set succeeded)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmpdir")
    with _reported(path, tmp, _old(path)):
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_orphans(path)
        _remove(tmp)
        held = False
        try:
            tmp.mkdir()
            yield tmp
            if _held is None:
                _swap(tmp, path)
            else:
                _held.append((tmp, path))
                held = True
        finally:
            if not held:
                _remove(tmp)


def _old(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.old")


def _swap(tmp: Path, path: Path) -> None:
    """`tmp` in place of `path`: a file by one rename; a folder by two, the old one deleted after."""
    if not tmp.is_dir():
        os.replace(tmp, path)
        return
    old = _old(path)
    moved = path.exists() or path.is_symlink()
    if moved:
        path.rename(old)
    try:
        tmp.rename(path)
    except BaseException:
        if moved:
            old.rename(path)
        raise
    _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def check_writable(*paths: str | Path) -> None:
    """Refuse at start-up outputs (files or folders) that could not be written at the end: the nearest existing
    folder above each must be a writable folder, and a file's path (one with an extension) not a folder."""
    for path in map(Path, paths):
        if path.suffix and path.is_dir():
            raise WriteError(f"{path}: cannot write (it is a folder; remove it)")
        existing = next(p for p in path.parents if p.exists())  # "." or "/" at the latest
        if not existing.is_dir():
            raise WriteError(f"{path}: cannot write ({existing} is not a folder)")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise WriteError(f"{path}: cannot write ({existing}/ is not writable)")


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def save_torch(path: str | Path, obj: Any) -> None:
    # Through a file object: given a path, torch.save names the archive inside after the (per-process)
    # temporary file, so the same object would give different bytes and DVC hashes on every run.
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        try:
            torch.save(obj, f)
        except RuntimeError as e:  # torch's zip writer reports a failed write as "unexpected pos"
            reason = str(e).splitlines()[0]
            raise WriteError(f"{path}: cannot write (torch.save: {reason}; is the disk full?)") from None


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

