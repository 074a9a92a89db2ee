"""`dvc plots show` / `dvc plots diff` pages draw offline: the committed DVC config points at
dvc_templates/offline.html (Vega inlined), and headless Chromium with every host name unresolvable draws a
chart for each vega plot of dvc.yaml, with no script error, failed load or console.error on the page."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from configparser import ConfigParser
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from dvc_render.base import Renderer
from dvc_render.vega import VegaRenderer

from tests.conftest import REPO, git, run_dvc

TEMPLATE_DIR = REPO / "dvc_templates"
TEMPLATE = TEMPLATE_DIR / "offline.html"
PLOTS = yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
# Div ids dvc-render gives the vega plots of dvc.yaml (named entries; a plain path entry is a folder of images).
VEGA_IDS = {Renderer.remove_special_chars(name) for entry in PLOTS if isinstance(entry, dict) for name in entry}
FILES = ["dvc.yaml", "params.yaml", ".dvc/config", ".dvcignore", "dvc_templates", "dvclive/plots",
         "plots/evaluate/per_class.csv", "plots/images"]
CHROMIUM = shutil.which("chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                  "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-extensions", "--host-resolver-rules=MAP * ~NOTFOUND",  # no host name resolves: offline
                  "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000", "--window-size=1400,3000"]

# Put first in <head> of the page under test: records uncaught errors, failed loads of scripts / images / styles
# (capture phase), unhandled promise rejections and console.error calls as JSON in <html data-page-errors>, which
# --dump-dom then shows. An attribute of "[]" proves the recorder ran and saw nothing.
RECORDER = """<script>
(function () {
  var errors = [], root = document.documentElement, consoleError = console.error;
  function add(kind, text) {
    errors.push(kind + ": " + text);
    root.setAttribute("data-page-errors", JSON.stringify(errors));
  }
  root.setAttribute("data-page-errors", "[]");
  window.addEventListener("error", function (e) {
    var t = e.target;
    if (t && t !== window) { add("failed load", t.tagName + " " + (t.src || t.href || "")); }
    else { add("uncaught", e.message + " (" + e.filename + ":" + e.lineno + ")"); }
  }, true);
  window.addEventListener("unhandledrejection", function (e) { add("unhandled rejection", String(e.reason)); });
  console.error = function () {
    add("console.error", Array.prototype.map.call(arguments, String).join(" "));
    return consoleError.apply(console, arguments);
  };
  window.addEventListener("load", function () {  // how far right the figures reach, against the window
    var right = 0;
    document.querySelectorAll("img").forEach(function (i) { right = Math.max(right, i.getBoundingClientRect().right); });
    root.setAttribute("data-image-reach", right + " " + window.innerWidth);
  });
})();
</script>"""


class PageDom(HTMLParser):
    """From Chromium's --dump-dom: <html data-page-errors>, and the tags inside each div whose id is tracked."""

    def __init__(self, ids: set[str]):
        super().__init__()
        self.ids, self.errors, self.inside, self.image_reach = ids, None, {}, None
        self.open: list[tuple[str, int]] = []  # (id, div depth) of tracked divs being read

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "html":
            self.errors = attrs.get("data-page-errors")
            self.image_reach = attrs.get("data-image-reach")
        for div_id, _ in self.open:
            self.inside[div_id].append((tag, attrs))
        if tag == "div":
            self.open = [(i, depth + 1) for i, depth in self.open]
            if attrs.get("id") in self.ids:
                self.inside.setdefault(attrs["id"], [])
                self.open.append((attrs["id"], 1))

    def handle_endtag(self, tag):
        if tag == "div":
            self.open = [(i, depth - 1) for i, depth in self.open if depth > 1]


def copy_plot_data(repo: Path) -> Path:
    """The project's DVC config, plot definitions, offline template and committed plot data in a git repo."""
    for name in FILES:
        src, dst = REPO / name, repo / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "plot data"]):
        git(repo, *args)
    return repo


def open_in_chromium(page: Path, screenshot: Path) -> tuple[PageDom, str]:
    """Load `page` in headless Chromium with no network; its DOM once rendered, and Chromium's stderr."""
    html = page.read_text(encoding="utf8")
    assert -1 < html.find("<head>") < html.find("<script"), "no <head> before the first script"
    page.write_text(html.replace("<head>", "<head>\n" + RECORDER, 1), encoding="utf8")
    result = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={page.parent / 'chromium-profile'}",
                             f"--screenshot={screenshot}", "--dump-dom", page.as_uri()],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0 and "</html>" in result.stdout, f"chromium failed:\n{result.stderr[-3000:]}"
    dom = PageDom(VEGA_IDS)
    dom.feed(result.stdout)
    return dom, result.stderr


def test_offline_template_inlines_the_versions_dvc_render_loads_from_its_cdn():
    config = ConfigParser()
    config.read(REPO / ".dvc/config")
    # DVC resolves a relative plots.html_template against the .dvc folder.
    assert (REPO / ".dvc" / config["plots"]["html_template"]).resolve() == TEMPLATE
    html = TEMPLATE.read_text(encoding="utf8")
    cdn = set(re.findall(r"cdn\.jsdelivr\.net/npm/([a-z-]+@[0-9.]+)", VegaRenderer.SCRIPTS))
    assert set(re.findall(r'<script data-lib="([a-z-]+@[0-9.]+)">', html)) == cdn and len(cdn) == 3
    # dvc-render replaces {scripts} with its CDN <script src> tags: the template must not have it.
    assert "{plot_divs}" in html and "{refresh_tag}" in html and "{scripts}" not in html
    assert not re.search(r"<script[^>]*\bsrc=", html)
    notices = (TEMPLATE_DIR / "THIRD_PARTY_LICENSES.md").read_text(encoding="utf8")
    for name, version in (lib.split("@") for lib in cdn):  # its row in the table of versions and licences
        assert re.search(rf"\| \[{name}\]\([^)]*\) \| {re.escape(version)} \| .* \| BSD-3-Clause \|", notices), name


@pytest.mark.skipif(CHROMIUM is None, reason="needs `chromium` on PATH (Debian: apt-get install chromium)")
@pytest.mark.parametrize("command", [["show"], ["diff", "HEAD"]], ids=["show", "diff"])
def test_plots_page_draws_every_vega_plot_offline_without_errors(command, tmp_path):
    repo = copy_plot_data(tmp_path / "repo")
    if command[0] == "diff":  # a workspace that differs from HEAD: half the epochs
        for history in (repo / "dvclive/plots").rglob("*.tsv"):
            lines = history.read_text().splitlines(keepends=True)
            history.write_text("".join(lines[: 1 + (len(lines) - 1) // 2]))
    run_dvc(repo, "plots", *command, "-o", str(tmp_path / "out"))
    page = tmp_path / "out/index.html"
    html = page.read_text(encoding="utf8")
    assert not re.search(r"<script[^>]*\bsrc=", html), "the page loads scripts from elsewhere"
    assert set(re.findall(r"vegaEmbed\('#([^']+)'", html)) == VEGA_IDS

    dom, stderr = open_in_chromium(page, tmp_path / "screenshot.png")

    assert dom.errors is not None, "the error recorder did not run"
    assert json.loads(dom.errors) == [], f"errors on the page: {dom.errors}"
    uncaught = [line for line in stderr.splitlines() if re.search(r'CONSOLE.*"Uncaught', line)]
    assert not uncaught, "\n".join(uncaught)
    for div_id in sorted(VEGA_IDS):  # Vega draws a chart as <canvas class="marks"> (or <svg class="marks">)
        charts = [a for tag, a in dom.inside.get(div_id, []) if tag in ("canvas", "svg")
                  and "marks" in (a.get("class") or "").split()]
        assert charts, f"plot {div_id!r} drew no chart"
        assert all(float(a.get("width", "0")) > 0 and float(a.get("height", "0")) > 0 for a in charts), charts
    right, width = map(float, dom.image_reach.split())
    assert 0 < right <= width, f"the figures reach {right} px in a {width} px window"  # side by side in a diff
    assert (tmp_path / "screenshot.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")  # to look at when it fails
