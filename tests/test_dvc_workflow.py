"""The DVC workflow end to end: exact stage dependencies, Phase 1 / Phase 2 as named experiments, and the
real `dvc` CLI in a git + DVC copy of the project with tiny params (repro, exp run, queue, metrics / params /
plots diff, remote push and pull)."""
from __future__ import annotations

import ast
import contextlib
import csv
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from offroad import ablation, artifacts, codebase
from offroad.config import load_params, read_overrides, validate
from tests.test_review import rows as table_rows
from tests.conftest import (REPO, TINY, TINY_PIPELINE, copy_project, copy_repo, git, run_dvc, with_overrides,
                            write_params)

DVC_YAML = yaml.safe_load((REPO / "dvc.yaml").read_text())
CLASS_NAMES = load_params(REPO / "params.yaml").data.class_names
STAGES = list(DVC_YAML["stages"])
PHASE1_ARGS = REPO / "experiments/phase1.args"
ABLATIONS = ("no-adamw", "no-augment")
# TINY data, 2 epochs, 2 example images: the whole pipeline in seconds.
TINY_RUN = {**TINY, "train.epochs": 2, "train.batch_size": 2, "train.num_workers": 0, "evaluate.examples": 2,
            "prepare.workers": 1}


PACKAGES = ("stages", "offroad")


def entry_module(stage: str) -> str:
    match = re.fullmatch(r"python -m (stages\.\w+)", DVC_YAML["stages"][stage]["cmd"])
    assert match, f"stage {stage}: cmd is not `python -m stages.NAME`"
    return match.group(1)


def import_closure(module: str) -> set[str]:
    """Files of the project's packages (stages, offroad) that `module` imports, transitively, itself included;
    written here independently of offroad.codebase, which the train stage's resume fingerprint uses."""
    files, todo = set(), [module]
    while todo:
        path = todo.pop().replace(".", "/") + ".py"
        if path in files:
            continue
        files.add(path)
        for node in ast.walk(ast.parse((REPO / path).read_text())):
            if isinstance(node, ast.Import):
                todo += [a.name for a in node.names if a.name.split(".")[0] in PACKAGES]
            elif isinstance(node, ast.ImportFrom) and node.module:
                if node.module in PACKAGES:  # from offroad import artifacts, metrics
                    todo += [f"{node.module}.{a.name}" for a in node.names]
                elif node.module.split(".")[0] in PACKAGES:
                    todo.append(node.module)
    return files


@pytest.mark.parametrize("stage", STAGES)
def test_stage_code_deps_are_exactly_its_import_closure(stage):
    deps = DVC_YAML["stages"][stage]["deps"]
    code = [d for d in deps if d.split("/")[0] in PACKAGES]
    assert set(code) == import_closure(entry_module(stage))
    assert len(code) == len(set(code))  # listed once
    assert [str(p) for p in codebase.import_closure(entry_module(stage))] == sorted(code)


@pytest.mark.parametrize("package", PACKAGES)
def test_package_inits_hold_no_code(package):
    # Every module imports its package's __init__.py; it is left out of deps because it holds no code.
    tree = ast.parse((REPO / package / "__init__.py").read_text())
    assert all(isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) for node in tree.body)


def test_the_library_never_imports_the_stages():
    for path in sorted((REPO / "offroad").glob("*.py")):
        assert not any(f.startswith("stages/") for f in import_closure(f"offroad.{path.stem}")), path


def test_the_docs_list_every_library_module_bottom_up():
    table = (REPO / "docs/architecture.md").read_text().split("| module | what it is |")[1].split("\n\n")[0]
    listed = re.findall(r"`offroad/(\w+)\.py`", table)
    assert sorted(listed) == sorted(p.stem for p in (REPO / "offroad").glob("*.py") if p.stem != "__init__")
    for i, module in enumerate(listed):
        imported = {f.removeprefix("offroad/").removesuffix(".py") for f in import_closure(f"offroad.{module}")}
        assert imported <= set(listed[:i + 1]), f"offroad/{module}.py imports a module listed below it"


def test_artifact_paths_are_stage_outputs_in_dvc_yaml():
    outs = {next(iter(o)) if isinstance(o, dict) else o for s in DVC_YAML["stages"].values() for o in s.get("outs", [])}
    paths = [*(v for v in vars(artifacts).values() if isinstance(v, Path)), *artifacts.CHECKPOINTS.values(),
             *artifacts.PER_IMAGE.values()]
    assert len(paths) > 10
    for path in map(str, paths):  # an output, the folder of several (data/prepared/<split>), or inside one (dvclive/)
        assert path in outs or any(out.startswith(f"{path}/") or path.startswith(f"{out}/") for out in outs), path


@pytest.mark.parametrize("stage", STAGES)
def test_stage_params_name_existing_keys(stage):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for key in DVC_YAML["stages"][stage]["params"]:
        node = params
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"stage {stage}: params key {key} not in params.yaml"
            node = node[part]


def test_phase1_overrides_give_the_report_phase1_recipe():
    default = load_params(REPO / "params.yaml")
    phase1 = validate(with_overrides(read_overrides(PHASE1_ARGS)), str(PHASE1_ARGS))
    assert (phase1.train.epochs, phase1.train.amp, phase1.train.checkpoint, phase1.train.early_stopping_patience) \
        == (10, False, "final", 0)
    assert (phase1.optimizer.name, phase1.optimizer.lr, phase1.optimizer.momentum) == ("sgd", 1e-4, 0.9)
    assert phase1.scheduler.name == "constant" and not phase1.augment.enabled
    assert (phase1.loss.name, phase1.loss.class_weighted) == ("cross_entropy", False)
    # Everything outside the report's "What Changed vs Phase 1" table is the Phase 2 default.
    for section in ("data", "synthetic", "prepare", "class_weights", "model", "evaluate", "plot"):
        assert getattr(phase1, section) == getattr(default, section)
    assert phase1.train.model_dump(exclude={"epochs", "amp", "checkpoint", "early_stopping_patience"}) \
        == default.train.model_dump(exclude={"epochs", "amp", "checkpoint", "early_stopping_patience"})


# --- the real dvc CLI -------------------------------------------------------------------------------------------

def ran(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


def series(text: str) -> list[dict[str, str]]:
    """The rows of one of DVCLive's .tsv series (step, value)."""
    return list(csv.DictReader(io.StringIO(text), delimiter="\t"))


def reset(repo: Path) -> None:
    """Workspace back to the committed state (params, lock, metrics and cached outputs)."""
    git(repo, "reset", "-q", "--hard")
    run_dvc(repo, "checkout", "--force", "--quiet")


def exp_file(repo: Path, name: str, path: str) -> str:
    """`path` as committed by experiment `name` (refs/exps/<baseline>/<name>)."""
    refs = [r for r in git(repo, "for-each-ref", "--format=%(refname)", "refs/exps").split()
            if r.endswith(f"/{name}")]
    assert len(refs) == 1, f"experiment {name}: refs {refs}"
    return git(repo, "show", f"{refs[0]}:{path}")


@pytest.fixture(scope="module")
def dvc_repo(tmp_path_factory) -> tuple[Path, str]:
    """A git + DVC copy of the project with TINY_RUN params committed, `dvc repro`'d and committed again.
    Shared by the tests below: each leaves the workspace as committed."""
    repo = copy_repo(tmp_path_factory.mktemp("dvc") / "repo", TINY_RUN)
    output = run_dvc(repo, "repro").stdout
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "tiny repro")
    return repo, output


def test_repro_runs_every_stage_once_in_order_then_nothing(dvc_repo):
    repo, output = dvc_repo
    assert ran(output) == STAGES
    scored = json.loads((repo / "metrics/evaluate.json").read_text())
    for split in ("val", "test"):  # the scores, recomputed from the per-image confusions
        names, cms = artifacts.read_per_image(CLASS_NAMES, repo / artifacts.PER_IMAGE[split])
        tp, truth, predicted = (np.diagonal(cms.sum(0)), cms.sum((0, 2)), cms.sum((0, 1)))
        present = truth > 0
        iou = tp[present] / (truth + predicted - tp)[present]
        assert scored[split]["miou"] == pytest.approx(iou.mean(), abs=1e-5)
        assert scored[split]["images"] == len(names) == TINY[f"synthetic.{split}"]
    assert len(series((repo / "dvclive/plots/metrics/val/iou.tsv").read_text())) == TINY_RUN["train.epochs"]
    assert json.loads(run_dvc(repo, "status", "--json").stdout) == {}
    again = run_dvc(repo, "repro").stdout
    assert ran(again) == [] and "Data and pipelines are up to date." in again


# A change and the stages whose own deps or params it touches (`dvc status`; repro then also runs their
# downstream stages). Code edits append a comment to the file.
CHANGES = [
    ({"synthetic.seed": 1}, {"synthesize"}),
    ({"data.image_size": [84, 42]}, {"prepare", "class_weights", "train", "evaluate"}),
    ({"data.ignore_index": 254}, {"prepare", "class_weights", "train", "evaluate"}),
    ({"class_weights.max_weight": 2.5}, {"class_weights"}),
    ({"optimizer.lr": 2.0e-3}, {"train"}),
    ({"train.checkpoint": "final"}, {"evaluate"}),
    ({"evaluate.batch_size": 4}, {"evaluate"}),
    ({"plot.dpi": 50}, {"plot"}),
    ("offroad/augment.py", {"train"}),
    ("offroad/runtime.py", {"train", "evaluate"}),
    ("offroad/figures.py", {"plot"}),
    ("offroad/config.py", set(STAGES)),
]


@pytest.mark.parametrize("change, stages", CHANGES, ids=[str(c) for c, _ in CHANGES])
def test_a_change_marks_exactly_the_stages_that_read_it(dvc_repo, change, stages):
    repo, _ = dvc_repo
    path = repo / (change if isinstance(change, str) else "params.yaml")
    original = path.read_bytes()
    try:
        if isinstance(change, str):
            path.write_bytes(original + b"\n# edited\n")
        else:
            write_params(path, {**TINY_RUN, **change})
        assert set(json.loads(run_dvc(repo, "status", "--json").stdout)) == stages
    finally:
        path.write_bytes(original)


def test_exp_run_with_a_new_lr_reruns_only_train_evaluate_plot(dvc_repo):
    repo, _ = dvc_repo
    try:
        output = run_dvc(repo, "exp", "run", "-n", "lr", "-S", "optimizer.lr=2.0e-3").stdout
        assert ran(output) == ["train", "evaluate", "plot"]
        assert all(f"Stage '{s}' didn't change, skipping" in output for s in ("synthesize", "prepare", "class_weights"))
        # The new lr was used: cosine from 2e-3 to min_lr over 2 epochs is at their mean after epoch 1.
        first = series((repo / "dvclive/plots/metrics/lr.tsv").read_text())[0]
        assert float(first["lr"]) == pytest.approx((2.0e-3 + 1.0e-6) / 2, rel=1e-5)
    finally:
        reset(repo)


@pytest.fixture(scope="module")
def phases(dvc_repo) -> tuple[Path, str]:
    """Phase 1 (the overrides file), Phase 2 (params.yaml) and two ablations (README: each a Phase 2 part
    reverted) queued as named experiments, then run."""
    repo, _ = dvc_repo
    run_dvc(repo, "exp", "run", "--queue", "-n", "phase1", *PHASE1_ARGS.read_text().split())
    run_dvc(repo, "exp", "run", "--queue", "-n", "phase2")
    for part in ABLATIONS:
        args = (REPO / f"experiments/ablation/{part.removeprefix('no-')}.args").read_text().split()
        run_dvc(repo, "exp", "run", "--queue", "-n", part, *args)
    assert git(repo, "status", "--porcelain") == ""  # queueing leaves the workspace alone
    return repo, run_dvc(repo, "exp", "run", "--run-all").stdout


def test_queued_phase1_and_phase2_both_run(phases):
    repo, output = phases
    sections = dict(re.findall(r"Reproducing experiment '(\w+)'\n(.*?)(?=Reproducing experiment|\Z)", output, re.S))
    assert ran(sections["phase1"]) == ["train", "evaluate", "plot"]
    assert ran(sections["phase2"]) == []  # the committed results already are Phase 2
    queue = run_dvc(repo, "queue", "status").stdout
    assert re.search(r"phase1 .* Success", queue) and re.search(r"phase2 .* Success", queue)
    phase1 = validate(yaml.safe_load(exp_file(repo, "phase1", "params.yaml")), "phase1 params.yaml")
    assert phase1 == validate(with_overrides({**TINY_RUN, **read_overrides(PHASE1_ARGS)}), "expected")
    rows = series(exp_file(repo, "phase1", "dvclive/plots/metrics/lr.tsv"))
    assert len(rows) == 10 and {float(row["lr"]) for row in rows} == {1e-4}


def test_ablation_table_from_queued_experiments(phases, tmp_path, monkeypatch):
    repo, _ = phases
    miou = {name: json.loads(exp_file(repo, name, "metrics/evaluate.json"))["test"]["miou"]
            for name in ("phase1", "phase2", *ABLATIONS)}
    assert miou["phase2"] == json.loads((repo / "metrics/evaluate.json").read_text())["test"]["miou"]
    monkeypatch.chdir(repo)
    ablation.main(["--full", "HEAD", "--base", "phase1", "--parts", *ABLATIONS, "--out", str(tmp_path / "t.md")])
    text = (tmp_path / "t.md").read_text()
    gain = miou["phase2"] - miou["phase1"]
    assert float(re.search(r"gain ([-+.\d]+) \[", text)[1]) == pytest.approx(gain, abs=1.5e-4)
    table = {name: cells for name, cells in table_rows(text).items() if name.startswith("no-")}
    assert list(table) == list(ABLATIONS)
    assert table["no-adamw"][1] == "optimizer.lr=0.0001, optimizer.name=sgd, optimizer.weight_decay=0"
    assert table["no-augment"][1] == "augment.enabled=False"
    for part in ABLATIONS:
        share = re.fullmatch(r"(?:unresolved \()?(-?\d+) % \[(-?\d+), (-?\d+)\]\)?", table[part][4])
        assert share, table[part]
        assert abs(int(share[1]) - 100 * (miou["phase2"] - miou[part]) / gain) <= 0.51
        assert float(table[part][3].split()[0]) == pytest.approx(miou["phase2"] - miou[part], abs=1e-4)


def test_metrics_and_params_diff_between_phase1_and_phase2(phases):
    repo, _ = phases
    phase1 = json.loads(exp_file(repo, "phase1", "metrics/evaluate.json"))
    phase2 = json.loads(exp_file(repo, "phase2", "metrics/evaluate.json"))
    assert phase2 == json.loads((repo / "metrics/evaluate.json").read_text())
    assert phase1["test"]["miou"] != phase2["test"]["miou"]
    diff = json.loads(run_dvc(repo, "metrics", "diff", "phase1", "phase2", "--json").stdout)["metrics/evaluate.json"]
    for split in ("test", "val"):
        for key in ("miou", "mdice", "pixel_accuracy", "loss"):
            old, new = phase1[split][key], phase2[split][key]
            assert (diff[f"{split}.{key}"]["old"], diff[f"{split}.{key}"]["new"]) == (old, new)
            assert diff[f"{split}.{key}"]["diff"] == pytest.approx(new - old)
    table = run_dvc(repo, "metrics", "diff", "phase1", "phase2", "--md").stdout
    assert re.search(r"^\| metrics/evaluate\.json +\| test\.miou +\|", table, re.M)

    tiny = with_overrides(TINY_RUN)
    changed = {k for k, v in read_overrides(PHASE1_ARGS).items() if v != value_at(tiny, k)}
    params = json.loads(run_dvc(repo, "params", "diff", "phase1", "phase2", "--json").stdout)["params.yaml"]
    assert set(params) == changed
    exp = json.loads(run_dvc(repo, "exp", "diff", "phase1", "phase2", "--json").stdout)
    assert exp["params"]["params.yaml"] == params
    assert exp["metrics"]["metrics/evaluate.json"]["test.miou"] == diff["test.miou"]


def value_at(raw: dict, key: str):
    for part in key.split("."):
        raw = raw[part]
    return raw


def expected_plots(repo: Path) -> set[str]:
    """Plot ids dvc.yaml defines: top-level plot names, and the files of a plain path entry (a folder of images)."""
    ids = set()
    for entry in DVC_YAML["plots"]:
        if isinstance(entry, dict):
            ids |= set(entry)
        elif (repo / entry).is_dir():
            ids |= {p.relative_to(repo).as_posix() for p in (repo / entry).iterdir()}
        else:
            ids.add(entry)
    return ids


def test_plots_show_and_diff_render_each_defined_plot_once(phases, tmp_path):
    repo, _ = phases
    shown = json.loads(run_dvc(repo, "plots", "show", "--json", "-o", str(tmp_path / "show")).stdout)["data"]
    assert set(shown) == expected_plots(repo)
    assert all(len(renders) == 1 and renders[0]["revisions"] == ["workspace"] for renders in shown.values())

    run_dvc(repo, "plots", "diff", "phase1", "phase2", "-o", str(tmp_path / "diff"))
    html = (tmp_path / "diff/index.html").read_text()
    for png in sorted((repo / "plots/images").glob("*.png")):
        for rev in ("phase1", "phase2"):
            src = f"static/{rev}_plots_images_{png.name}"
            assert html.count(f'<img src="{src}">') == 1 and (tmp_path / "diff" / src).is_file()
    for entry in DVC_YAML["plots"]:
        for title in entry if isinstance(entry, dict) else []:
            assert html.count(f'"text": "{title}"') == 1


def test_push_to_a_local_remote_then_a_fresh_clone_pulls_a_clean_pipeline(dvc_repo, tmp_path):
    repo, _ = dvc_repo
    remote = tmp_path / "remote"
    # --local keeps the shared repo's committed config as it is; a real project commits .dvc/config.
    run_dvc(repo, "remote", "add", "--local", "-d", "storage", str(remote))
    run_dvc(repo, "push")
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(repo), str(clone))
    run_dvc(clone, "remote", "add", "-d", "storage", str(remote))
    run_dvc(clone, "pull")
    assert json.loads(run_dvc(clone, "status", "--json").stdout) == {}
    output = run_dvc(clone, "repro").stdout
    assert ran(output) == [] and "Data and pipelines are up to date." in output
    for path in ("models/best.pt", "data/class_weights.json", "data/prepared/val/masks.npy"):
        assert (clone / path).read_bytes() == (repo / path).read_bytes()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_stage_refused_at_start_up_keeps_its_outputs_under_dvc_repro(reproduced_project, tmp_path):
    repo = copy_project(reproduced_project, tmp_path / "repo")
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]

    def outputs(stage: str) -> dict[str, bytes]:
        paths = [Path(next(iter(o))) if isinstance(o, dict) else Path(o) for o in stages[stage]["outs"]]
        files = [f for p in paths for f in ([repo / p] if (repo / p).is_file() else sorted((repo / p).rglob("*")))]
        return {str(f.relative_to(repo)): f.read_bytes() for f in files if f.is_file()}

    write_params(repo / "params.yaml", {**TINY_PIPELINE, "train.device": "cuda"})
    for stage in ("train", "evaluate"):
        before = outputs(stage)
        assert len(before) >= 5
        result = run_dvc(repo, "repro", "-f", "-s", stage, check=False)
        assert result.returncode != 0
        assert "train.device is 'cuda' but no CUDA device is available" in result.stdout + result.stderr
        assert outputs(stage) == before


def test_a_queued_run_shows_its_epochs_in_exp_show_while_it_trains(tmp_path):
    """DVCLive logs each epoch as it ends: `dvc exp show` lists a queued experiment that is still running with
    the epoch it reached and that epoch's val mIoU, before its results (epochs_run) exist."""
    epochs = 40
    repo = copy_repo(tmp_path / "repo", {**TINY_RUN, "train.epochs": epochs, "train.early_stopping_patience": 0})
    run_dvc(repo, "exp", "run", "--queue", "-n", "watched")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "NO_ALBUMENTATIONS_UPDATE": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    # not captured: the queue's worker keeps the pipes open until the queue is empty
    subprocess.run([sys.executable, "-m", "dvc", "queue", "start"], cwd=repo, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen, refused = [], []  # (executor state, step, val iou, epochs_run) at each look; failed looks
    deadline = time.monotonic() + 600
    try:
        while len(seen) < 600 and (not seen or seen[-1][0] not in ("success", "failed")):
            assert time.monotonic() < deadline, f"the run did not end in 600 s: {seen[-3:]}, {refused[-3:]}"
            try:  # DVC can fail, or (rarely) hang, while the queue sets up or removes the run's temporary workspace
                looked = run_dvc(repo, "exp", "show", "--json", check=False, timeout=60)
            except subprocess.TimeoutExpired:
                looked = subprocess.CompletedProcess([], 1, "", "dvc exp show still running after 60 s")
            if looked.returncode:
                refused.append(looked.stderr)
                assert len(refused) < 20, refused
                continue
            shown = json.loads(looked.stdout)
            for exp in (e for baseline in shown for e in baseline.get("experiments") or []):
                if exp.get("name") == "watched":
                    data = exp["revs"][0].get("data") or {}  # None while DVC cannot read the run yet
                    live = ((data.get("metrics") or {}).get("dvclive/metrics.json") or {})
                    live = live.get("data") or {}
                    seen.append(((exp.get("executor") or {}).get("state"), live.get("step"),
                                 (live.get("val") or {}).get("iou"), live.get("epochs_run")))
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            run_dvc(repo, "queue", "kill", "watched", check=False, timeout=60)
    mid_run = [s for s in seen if s[0] == "running" and s[1] and s[3] is None]
    assert mid_run, f"never seen running with an epoch logged and no results yet: {seen}"
    assert 1 <= mid_run[-1][1] < epochs and 0 <= mid_run[-1][2] <= 1
    assert seen[-1][0] == "success" and seen[-1][1] == seen[-1][3] == epochs  # the last epoch, and the results
