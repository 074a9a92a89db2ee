"""The review report (python -m offroad.review): paired verdicts, the report's sections, the real dvc revisions it
reads; and a quiet `dvc metrics diff` after a rerun with nothing changed."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from offroad import ablation, artifacts, bootstrap, evidence, metrics, review
from offroad.errors import PipelineError
from tests.conftest import TINY_PIPELINE, copy_project, run_dvc, write_params

K = 3
PIXELS = 1000  # per class and image


def image_cms(accuracy: np.ndarray) -> np.ndarray:
    """[N, K, K]: every image has PIXELS of each class; a share `accuracy[i]` of them right, the rest taken for
    the next class."""
    right = np.round(np.asarray(accuracy) * PIXELS).astype(np.int64)
    cms = np.zeros((len(right), K, K), np.int64)
    for c in range(K):
        cms[:, c, c] = right
        cms[:, c, (c + 1) % K] = PIXELS - right
    return cms


def test_identical_runs_are_within_noise_everywhere():
    cms = image_cms(np.random.default_rng(0).uniform(0.2, 0.9, 25))
    result = bootstrap.paired(cms, cms.copy())
    assert {s: r["verdict"] for s, r in result.items()} == dict.fromkeys(metrics.SCORES, "within noise")
    assert all(r["change"] == r["low"] == r["high"] == 0 for r in result.values())


def test_a_large_real_difference_is_better_and_its_reverse_worse():
    rng = np.random.default_rng(1)
    old, new = image_cms(rng.uniform(0.4, 0.6, 20)), image_cms(rng.uniform(0.8, 0.95, 20))
    better, worse = bootstrap.paired(old, new), bootstrap.paired(new, old)
    assert {s: r["verdict"] for s, r in better.items()} == dict.fromkeys(metrics.SCORES, "better")
    assert {s: r["verdict"] for s, r in worse.items()} == dict.fromkeys(metrics.SCORES, "worse")
    assert better["pixel_accuracy"]["change"] == pytest.approx(new.trace(axis1=1, axis2=2).sum() / new.sum()
                                                               - old.trace(axis1=1, axis2=2).sum() / old.sum())


def test_pairing_decides_where_the_unpaired_intervals_overlap():
    # Images of very different difficulty, each a little easier for the new model: the spread between images
    # swamps the gain in each side's own interval, and cancels out of the paired difference.
    rng = np.random.default_rng(2)
    accuracy = rng.uniform(0.3, 0.85, 40)
    old, new = image_cms(accuracy), image_cms(accuracy + 0.02 + rng.uniform(-0.005, 0.005, 40))
    alone_old, alone_new = bootstrap.intervals(old), bootstrap.intervals(new)
    result = bootstrap.paired(old, new)
    for score in ("miou", "pixel_accuracy"):
        assert alone_new[score][0] < alone_old[score][1]  # the unpaired intervals overlap
        assert result[score]["verdict"] == "better" and result[score]["low"] > 0.01


CLASSES = [{"name": n} for n in ("Background", "Trees", "Sky")]


def side(rev: str, cms: np.ndarray | None, lr: float = 5e-4) -> review.Group:
    """One run, as a review side."""
    scores = metrics.dataset_scores(cms.sum(0)) if cms is not None else dict.fromkeys(metrics.SCORES, 0.5)
    per_image = None if cms is None else ([f"test_{i:03d}.png" for i in range(len(cms))], cms)
    run = review.Side(rev, {"optimizer.lr": lr, "train.epochs": 30, "data.classes": CLASSES},
                      {**{f"test.{k}": float(v) for k, v in scores.items()}, "test.loss": 1.0, "best_epoch": 3}, {},
                      per_image, {"plots/images/per_class_iou.png": b"png"})
    return review.Group(rev, [run])


def rows(markdown: str) -> dict[str, list[str]]:
    """Table rows by their first cell (markup stripped)."""
    found = {}
    for line in markdown.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            found[re.sub(r"[*`]", "", cells[0])] = [re.sub(r"[*`]", "", c) for c in cells[1:]]
    return found


def test_report_lists_changed_params_verdicts_per_class_iou_and_figures(tmp_path):
    rng = np.random.default_rng(3)
    old, new = image_cms(rng.uniform(0.4, 0.6, 20)), image_cms(rng.uniform(0.8, 0.95, 20))
    text = review.report(side("main", old), side("lr1e-3", new, lr=1e-3), out=tmp_path / "report.md")
    table = rows(text)
    assert table["optimizer.lr"] == ["0.0005", "0.001"] and "train.epochs" not in table
    assert table["test.miou"][-1] == "better" and table["test.pixel_accuracy"][-1] == "better"
    assert table["test.loss"] == ["1", "1", "+0", "", ""]  # no per-image form: no verdict
    assert table["Sky"][-1] == "better"  # per class, with its own interval
    assert table["per_class_iou.png"] == ["[main](report_figures/old/per_class_iou.png)",
                                          "[lr1e-3](report_figures/new/per_class_iou.png)"]
    assert (tmp_path / "report_figures/new/per_class_iou.png").read_bytes() == b"png"


def test_the_tested_rows_score_the_images_the_interval_is_over():
    rng = np.random.default_rng(4)
    old, new = image_cms(rng.uniform(0.4, 0.6, 20)), image_cms(rng.uniform(0.4, 0.6, 25))
    new[20:] = image_cms(np.full(5, 0.99))  # 5 easy images only the new side scored
    table = rows(text := review.report(side("old", old), side("new", new)))
    on_common = {n: metrics.dataset_scores(cms[:20].sum(0))["miou"] for n, cms in (("old", old), ("new", new))}
    assert table["test.miou"][:3] == [f"{on_common['old']:.4f}", f"{on_common['new']:.4f}",
                                      f"{on_common['new'] - on_common['old']:+.4f}"]
    low, high = (float(x) for x in table["test.miou"][3].strip("[]").split(", "))
    assert low <= on_common["new"] - on_common["old"] <= high
    assert "Left out, scored by one run only: 5 image(s) of `new`; the tested rows score the 20 images" in text


def test_one_common_image_gets_no_interval_and_no_verdict():
    old, new = image_cms([0.5]), image_cms([0.6])
    text = review.report(side("old", old), side("new", new))
    assert "Only 1 test image was scored by every run: no intervals and no verdicts" in text
    assert review.verdicts(text) == [] and rows(text)["test.miou"][-2:] == ["", ""]


def test_report_names_the_side_without_per_image_data():
    cms = image_cms(np.full(5, 0.5))
    text = review.report(side("v1.0", None), side("workspace", cms))
    assert "`v1.0` has no per-image data" in text and "git checkout v1.0 -- params.yaml dvc.lock" in text
    assert "`workspace` has no per-image data" not in text
    assert "better" not in text and "within noise" not in text
    text = review.report(side("a", cms), side("workspace", None))
    assert "`workspace` has no per-image data (`metrics/per_image/test.csv`), so its scores cannot be tested " \
           "against noise. To produce it, run `dvc repro evaluate`." in text


# --- real revisions, through dvc ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rerun(reproduced_project, tmp_path_factory) -> tuple[Path, str]:
    """The reproduced project, committed, after `dvc repro -f -s train` (train again, nothing changed)."""
    repo = copy_project(reproduced_project, tmp_path_factory.mktemp("rerun") / "repo")
    run_dvc(repo, "repro", "-f", "-s", "train")
    return repo, run_dvc(repo, "metrics", "diff").stdout


def test_a_rerun_with_nothing_changed_leaves_metrics_diff_quiet(rerun):
    repo, diff = rerun
    assert diff == ""
    # how the run ran (timings, device) is kept, in a file the default diff leaves out; --targets compares it
    speed = json.loads(run_dvc(repo, "metrics", "diff", "--targets", "metrics/run/train.json", "--all",
                               "--json").stdout)["metrics/run/train.json"]
    assert {"train_seconds", "images_per_second", "backbone_seconds_saved", "world_size"} <= set(speed)
    assert speed["train_seconds"]["new"] == json.loads((repo / "metrics/run/train.json").read_text())["train_seconds"]
    shown = json.loads(run_dvc(repo, "metrics", "show", "--json").stdout)
    values = [v for f in shown.values() for m in f["data"].values() for v in _leaves(m.get("data", {}))]
    assert values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)  # numbers only
    assert "train_seconds" not in json.loads((repo / "dvclive/metrics.json").read_text())


def _leaves(tree):
    for value in tree.values():
        yield from _leaves(value) if isinstance(value, dict) else [value]


def test_review_of_real_revisions_and_experiments(rerun, tmp_path, monkeypatch):
    repo, _ = rerun
    monkeypatch.chdir(repo)
    review.main(["HEAD", "--out", str(tmp_path / "same.md")])  # HEAD against the rerun workspace
    same = (tmp_path / "same.md").read_text()
    assert "No param changed." in same
    verdicts = [cells[-1] for name, cells in rows(same).items() if name in review.TESTED]
    assert verdicts == ["within noise"] * len(metrics.SCORES)
    assert sorted(p.name for p in (tmp_path / "same_figures/new").iterdir()) == \
        sorted(p.name for p in (repo / "plots/images").iterdir())

    review.main(["HEAD~1", "HEAD", "--out", str(tmp_path / "bare.md")])  # the commit before any results
    assert "`HEAD~1` has no per-image data" in (tmp_path / "bare.md").read_text()

    run_dvc(repo, "exp", "run", "-n", "batch1", "-S", "evaluate.batch_size=1")  # reruns evaluate and plot only
    review.main(["HEAD", "batch1", "--out", str(tmp_path / "exp.md")])
    table = rows((tmp_path / "exp.md").read_text())
    assert table["evaluate.batch_size"] == ["8", "1"]
    assert [table[s][-1] for s in review.TESTED] == ["within noise"] * len(metrics.SCORES)

    with pytest.raises(PipelineError, match="no-such-rev: no evidence/no-such-rev/ and no git revision or experiment"):
        review.main(["no-such-rev"])


def test_evidence_is_saved_under_evidence_only_and_from_a_reproduced_workspace_only(reproduced_project, tmp_path,
                                                                                    monkeypatch, capsys):
    repo = copy_project(reproduced_project, tmp_path / "repo")
    monkeypatch.chdir(repo)
    outputs = {p: p.read_bytes() for top in ("metrics", "models") for p in (repo / top).rglob("*") if p.is_file()}
    for name in ("../metrics", "x/../../models", "", ".", "..", str(tmp_path / "abs"), "a b", "a//b"):
        with pytest.raises(PipelineError, match=rf"evidence name {re.escape(repr(name))}: give a plain name"):
            evidence.main([name, "--force"])
    assert {p: p.read_bytes() for p in outputs} == outputs and not (repo / "evidence").exists()
    assert not (tmp_path / "abs").exists()

    evidence.main(["tiny/seed0"])
    assert (repo / "evidence/tiny/seed0/metrics/evaluate.json").read_bytes() == outputs[repo / artifacts.EVAL_METRICS]
    write_params(repo / "params.yaml", {**TINY_PIPELINE, "train.seed": 5})  # and no `dvc repro`
    with pytest.raises(PipelineError, match=r"workspace: the outputs of train are not those of its "
                                            r"params.yaml, code or data \(`dvc status`\); run `dvc repro` first"):
        evidence.main(["stale"])
    assert not (repo / "evidence/stale").exists()
    capsys.readouterr()
    review.read_side(review.WORKSPACE, figures=False)
    assert capsys.readouterr().err.startswith("warning: workspace: the outputs of train are not those")


@pytest.mark.parametrize("args, message", [
    (["--resamples", "0"], "argument --resamples: 0 is outside 1..100000"),
    (["--resamples", "-5"], "argument --resamples: -5 is outside 1..100000"),
    (["--resamples", "4e8"], "argument --resamples: '4e8' is not a whole number"),
    (["--seed", "-1"], "argument --seed: -1 is outside 0..4294967295"),
])
@pytest.mark.parametrize("command", [review.main, ablation.main])
def test_resampling_options_out_of_range_get_one_line(command, args, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        command(args)
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(message)


def test_reports_never_overwrite_pipeline_or_tracked_files_unless_forced(rerun, tmp_path, monkeypatch):
    repo = copy_project(rerun[0], tmp_path / "repo")
    monkeypatch.chdir(repo)
    before = {p: p.read_bytes() for p in (Path("metrics/per_image/test.csv"), Path("metrics/evaluate.json"))}
    for command, out, reason in ((review.main, "metrics/per_image/test.csv", "the pipeline reads or writes it"),
                                 (ablation.main, "metrics/evaluate.json", "the pipeline reads or writes it"),
                                 (review.main, "plots/images/report.md", "the pipeline reads or writes it"),
                                 (review.main, ".gitignore", "git tracks it")):
        with pytest.raises(PipelineError, match=f"--out {re.escape(out)}: would overwrite .*\\({reason}\\)"):
            command(["HEAD", "--out", out] if command is review.main else ["--out", out])
    with pytest.raises(PipelineError, match="--out plots is a folder"):
        review.main(["HEAD", "--out", "plots"])
    assert {p: p.read_bytes() for p in before} == before
    assert not list(Path(".").glob("**/*_figures/*"))  # refused before anything was written

    review.main(["HEAD", "--out", ".gitignore", "--force"])
    assert Path(".gitignore").read_text().startswith("## Review: `HEAD`")


PER_IMAGE_HEADER = "image,truth,prediction,count\n"


@pytest.mark.parametrize("rows, message", [
    ("a.png,Sky,Sky,-4\n", "line 2: count -4 is not a pixel count"),
    ("a.png,Sky,Sky,0\n", "line 2: count 0 is not a pixel count"),
    ("a.png,Sky,Sky,99999999999999999999\n", "line 2: count 99999999999999999999 is not a pixel count"),
    ("a.png,Sky,Sky,40\na.png,Sky,Trees,1", "the last row ends without a newline: the file was cut off"),
    ("a.png,Sky,Sky,40\na.png,Sky,Sky,2\n", "line 3: a second row for image 'a.png', Sky -> Sky"),
    ("a.png,Sky,Sky,4.5\n", "line 2: bad row"),
    ("a.png,Sky,Lava,4\n", "line 2: class 'Lava' is not in data.classes"),
])
def test_per_image_files_that_are_not_pixel_counts_are_refused(rows, message):
    with pytest.raises(artifacts.ArtifactError, match=re.escape(message)):
        artifacts.parse_per_image(PER_IMAGE_HEADER + rows, ["Background", "Trees", "Sky"], "per_image.csv")
    names, cms = artifacts.parse_per_image(PER_IMAGE_HEADER + "a.png,Sky,Sky,40\na.png,Sky,Trees,1\n",
                                           ["Background", "Trees", "Sky"], "per_image.csv")
    assert names == ["a.png"] and cms[0, 2, 2] == 40 and cms[0, 2, 1] == 1 and cms.sum() == 41


def test_per_image_matrices_and_evaluate_json_of_different_evaluations_are_refused():
    cms = image_cms(np.random.default_rng(4).uniform(0.3, 0.9, 6))
    scores = {k: round(float(v), 5) for k, v in metrics.dataset_scores(cms.sum(0)).items()}
    review.check_one_evaluation("HEAD", {**scores, "images": 6}, cms)  # one evaluation: accepted
    review.check_one_evaluation("HEAD", {**scores, "images": 8}, cms)  # 2 images without labelled pixels
    with pytest.raises(review.ReviewError, match="disagree: 6 images against 4"):
        review.check_one_evaluation("HEAD", {**scores, "images": 4}, cms)
    with pytest.raises(review.ReviewError, match=r"disagree: miou .* against 0\.1; they come from different"):
        review.check_one_evaluation("HEAD", {**scores, "miou": 0.1, "images": 6}, cms)
    review.check_one_evaluation("HEAD", {**scores, "images": 6}, cms[::-1])  # the same images, another order
    other = image_cms(np.random.default_rng(5).uniform(0.3, 0.9, 6))  # another split's images, same count
    with pytest.raises(review.ReviewError, match="disagree: miou"):
        review.check_one_evaluation("HEAD", {**scores, "images": 6}, other)


def test_sides_with_other_classes_are_refused_not_scored_across():
    cms = image_cms(np.full(5, 0.5))
    ten, eleven = side("HEAD", cms), side("eleven", cms)
    ten.runs[0].params["data.classes"] = [{"name": n} for n in ("Background", "Trees", "Sky")]
    eleven.runs[0].params["data.classes"] = [{"name": n} for n in ("Background", "Trees", "Sky", "Water")]
    with pytest.raises(review.ReviewError, match=r"`HEAD` has 3 classes and `eleven` 4 \(Water\): their scores "
                                                 "cannot be compared"):
        review.report(ten, eleven)
    with pytest.raises(review.ReviewError, match="cannot be compared"):
        review.same_classes([ten, ten, eleven])
    review.same_classes([ten, ten])


def test_an_empty_per_image_file_or_an_image_count_that_is_not_a_count_is_refused():
    cms = image_cms(np.random.default_rng(6).uniform(0.3, 0.9, 3))
    scores = {k: round(float(v), 5) for k, v in metrics.dataset_scores(cms.sum(0)).items()}
    with pytest.raises(review.ReviewError, match="disagree: no image rows against a scored evaluation"):
        review.check_one_evaluation("workspace", {**scores, "images": 3}, cms[:0])
    for images in (float("inf"), 3.0, True, -1):
        with pytest.raises(review.ReviewError, match=r"metrics/evaluate.json: images .* is not a count"):
            review.check_one_evaluation("workspace", {**scores, "images": images}, cms)
