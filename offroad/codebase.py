"""The project's own source files a module depends on, found from its imports.

dvc.yaml lists these files as each stage's code deps (tests check it), and the train stage hashes them
(source_digest) into its resume fingerprint, so both see the same code.
"""
from __future__ import annotations

import ast
import hashlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("stages", "offroad")


def module_file(module: str) -> Path:
    """Repository-relative path of a module of PACKAGES."""
    return Path(*module.split(".")).with_suffix(".py")


def _imports(module: str) -> list[str]:
    tree = ast.parse((ROOT / module_file(module)).read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module in PACKAGES:  # from offroad import artifacts, metrics
                found += [f"{node.module}.{a.name}" for a in node.names]
            else:
                found.append(node.module)
    return [m for m in found if m.split(".")[0] in PACKAGES and m not in PACKAGES]


def import_closure(module: str) -> list[Path]:
    """`module`'s file and every project file it imports, transitively, sorted (package __init__ files hold
    no code and are left out)."""
    seen, todo = set(), [module]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo += _imports(current)
    return sorted(module_file(m) for m in seen)


def source_digest(module: str) -> str:
    """sha256 of the files of `module`'s import closure: changes whenever the code it runs changes."""
    h = hashlib.sha256()
    for f in import_closure(module):
        h.update((ROOT / f).read_bytes())
    return h.hexdigest()
