"""The docs: every generated number matches the committed results, and the commands the docs mark as
working on a fresh clone do, on a real `git clone` without training."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from offroad import docs

REPO = Path(__file__).resolve().parents[1]
FRESH = re.compile(r"<!-- fresh-clone -->\n```bash\n(.*?)```", re.S)


def test_every_generated_number_matches_the_committed_results(monkeypatch):
    monkeypatch.chdir(REPO)
    docs.main(["--check"])  # exits 1 on a stale block


def test_a_hand_edited_number_fails_the_check(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    page = tmp_path / "README.md"
    text = (REPO / "README.md").read_text()
    block = re.search(r"<!-- generated: results -->\n(.*?)<!-- /generated -->", text, re.S)
    assert block, "README.md has no results block"
    edited = re.sub(r"0\.(\d)(\d)", lambda m: f"0.{m[1]}{(int(m[2]) + 1) % 10}", block[1], count=1)
    assert edited != block[1]
    page.write_text(text.replace(block[1], edited))
    with pytest.raises(SystemExit) as stopped:
        docs.main(["--check", str(page)])
    assert stopped.value.code == 1
    docs.main([str(page)])  # regenerating restores it
    assert page.read_text() == text


def test_an_unknown_block_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    page = tmp_path / "page.md"
    page.write_text("<!-- generated: nonsense -->\n<!-- /generated -->\n")
    with pytest.raises(docs.PipelineError, match="unknown generated block 'nonsense'"):
        docs.main(["--check", str(page)])


@pytest.mark.parametrize("broken, message", [
    (lambda t: t.replace("<!-- /generated -->\n", "", 1), "the block opened here has no `<!-- /generated -->`"),
    (lambda t: t.replace("<!-- generated: results -->", "<!--  generated: results -->"), "is not a block marker"),
    (lambda t: t.replace("<!-- generated: results -->\n", "", 1), "<!-- /generated --> closes no block"),
])
def test_a_broken_block_marker_is_named_not_skipped(tmp_path, monkeypatch, broken, message):
    monkeypatch.chdir(REPO)
    page = tmp_path / "README.md"
    page.write_text(broken((REPO / "README.md").read_text()).replace("0.4", "0.9"))  # and its numbers edited
    with pytest.raises(docs.PipelineError, match=re.escape(message)):
        docs.main(["--check", str(page)])


def fresh_clone_commands() -> list[tuple[str, str]]:
    """(page, command) for each line of the bash blocks marked `<!-- fresh-clone -->`."""
    found = []
    for page in docs.PAGES:
        for block in FRESH.findall((REPO / page).read_text()):
            found += [(str(page), line.split("  #")[0].strip()) for line in block.splitlines()
                      if line.strip() and not line.lstrip().startswith("#")]
    return found


def test_the_docs_mark_commands_for_a_fresh_clone():
    commands = [c for _, c in fresh_clone_commands()]
    assert any("offroad.review phase1 phase2" in c for c in commands)
    assert any("offroad.ablation" in c for c in commands)


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """A `git clone` of the committed project: no DVC cache, no data, no models, no experiments."""
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    target = tmp_path_factory.mktemp("fresh") / "repo"
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(REPO), str(target)], check=True)
    return target


@pytest.mark.parametrize("page, command", fresh_clone_commands())
def test_a_fresh_clone_command_runs(clone, page, command):
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(clone),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run(command, shell=True, cwd=clone, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{page}: `{command}` failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    assert "Traceback" not in result.stderr
    shutil.rmtree(clone / "dvc_plots", ignore_errors=True)
