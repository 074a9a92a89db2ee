"""Rebuild offline.html: the DVC plots page with Vega inlined, so `dvc plots show|diff` pages draw without internet.

Reads the vega, vega-lite and vega-embed versions that the installed dvc-render loads from its CDN, fetches
exactly those packages with `npm pack` (needs npm and the npm registry), and inlines each package's browser
build (its package.json "jsdelivr" file, the one the CDN URL serves) minus the trailing sourceMappingURL line.
Run after a dvc-render upgrade, then update the versions and checksums in THIRD_PARTY_LICENSES.md:

    python dvc_templates/build_offline.py
"""
from __future__ import annotations

import hashlib
import json
import re
import subprocess
import tarfile
import tempfile
from pathlib import Path

from dvc_render.vega import VegaRenderer

HERE = Path(__file__).resolve().parent
LIBS = ("vega", "vega-lite", "vega-embed")  # load order: vega-lite needs vega, vega-embed needs both
PLACEHOLDERS = ("{scripts}", "{plot_divs}", "{refresh_tag}")  # what dvc-render's HTML.embed replaces

HEAD = """<!DOCTYPE html>
<!-- DVC plots page that works offline: `dvc plots show|diff` fill the refresh and plot placeholders below.
     Inlined npm builds of the versions dvc-render loads from cdn.jsdelivr.net: {versions}
     (BSD-3-Clause, see THIRD_PARTY_LICENSES.md next to this file); each is the package's file byte for byte
     but for its last line, a sourceMappingURL comment. Made by build_offline.py.
     There is deliberately no scripts placeholder, so dvc-render's CDN script tags are left out. -->
<html>
<head>
    <meta charset="utf-8">
    {{refresh_tag}}
    <title>DVC Plot</title>
"""
TAIL = """
    <style>
        table {
            border-spacing: 15px;
            table-layout: fixed;
            width: 100%;
        }
        /* image plots: the revisions side by side, sharing the window (dvc-render lets them overflow it) */
        div:has(> div > img) {
            display: flex !important;
            flex-wrap: wrap;
            justify-content: center;
        }
        div:has(> div > img) > p {
            flex-basis: 100%;
        }
        div:has(> img) {
            flex: 1 1 0;
            min-width: 0;
        }
        img {
            max-width: 100%;
            height: auto;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def cdn_versions() -> dict[str, str]:
    """{package: version} from dvc-render's CDN script tags (https://cdn.jsdelivr.net/npm/NAME@VERSION)."""
    found = dict(re.findall(r"cdn\.jsdelivr\.net/npm/([a-z-]+)@([0-9.]+)", VegaRenderer.SCRIPTS))
    assert sorted(found) == sorted(LIBS), f"unexpected dvc-render scripts: {VegaRenderer.SCRIPTS}"
    return found


def browser_build(name: str, version: str, workdir: Path) -> tuple[str, str, str]:
    """(file inside the package, its sha256, its text without the sourceMappingURL line) for name@version."""
    tgz = subprocess.run(["npm", "pack", "--silent", f"{name}@{version}"], cwd=workdir, check=True,
                         capture_output=True, text=True).stdout.strip().splitlines()[-1]
    with tarfile.open(workdir / tgz) as tar:
        meta = json.load(tar.extractfile("package/package.json"))
        assert meta["version"] == version and meta["license"] == "BSD-3-Clause", (name, meta["license"])
        member = meta["jsdelivr"].removeprefix("./")
        data = tar.extractfile(f"package/{member}").read()
    js = data.decode("utf8").rstrip()
    js = re.sub(r"\n//# sourceMappingURL=\S+$", "", js)
    # Inline <script> content must not close the element early, and dvc-render must not substitute inside it.
    assert "</script" not in js.lower() and "<!--" not in js and not any(p in js for p in PLACEHOLDERS)
    return member, hashlib.sha256(data).hexdigest(), js


def main() -> None:
    versions = cdn_versions()
    scripts, listed = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in LIBS:
            member, sha, js = browser_build(name, versions[name], Path(tmp))
            scripts.append(f'    <script data-lib="{name}@{versions[name]}">\n{js}\n    </script>')
            listed.append(f"{name}@{versions[name]} ({member})")
            print(f"{name}@{versions[name]} {member} sha256 {sha}")
    page = HEAD.format(versions=", ".join(listed)) + "\n".join(scripts) + TAIL
    (HERE / "offline.html").write_text(page, encoding="utf8")


if __name__ == "__main__":
    main()
