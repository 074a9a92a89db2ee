import csv
import json
import math
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from offroad import artifacts, atomic, bootstrap, figures, predict
from offroad.segmenter import load_segmenter
from stages import evaluate, plot
from offroad.data import class_lut, map_mask
from offroad.raw import read_mask
from offroad.errors import PipelineError
from offroad.segmenter import build_model, head_checkpoint
from offroad.config import load_params
from offroad.visualize import IGNORE_COLOR, PALETTE, colorize, overlay, palette
from tests.conftest import REPO, TINY, history_rows, write_history, write_params
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NAMES = ["Background", "Trees", "Lush Bushes", "Dry Grass", "Dry Bushes", "Ground Clutter", "Logs", "Rocks",
         "Landscape", "Sky"]


def write_csv(path: Path, rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def fabricate_plot_inputs(root: Path, epochs: int = 6, examples: int = 2) -> None:
    """Train and evaluate outputs in their real formats, with made-up numbers."""
    rng = np.random.default_rng(0)
    history = []
    for e in range(1, epochs + 1):
        t = 1 - math.exp(-e / 2)
        history.append(dict(zip(artifacts.HISTORY_COLUMNS, [
            e, 0.9 - 0.3 * t, 0.8 - 0.2 * t, 0.3 + 0.1 * t, 0.3 + 0.1 * t - 0.01 * (e == epochs), 0.45 + 0.1 * t,
            0.47 + 0.1 * t, 0.7 + 0.04 * t, 0.71 + 0.04 * t, 5e-4 * 0.5 * (1 + math.cos(math.pi * (e - 1) / epochs))])))
    write_history(root / artifacts.LIVE, history)
    ious = rng.uniform(0.05, 0.95, len(NAMES))
    write_csv(root / artifacts.PER_CLASS, [list(artifacts.PER_CLASS_COLUMNS)] +
              [[n, i, 2 * i / (1 + i), i, i, 0.1] for n, i in zip(NAMES, ious)])
    cm = rng.integers(0, 500, (10, 10)) + 5000 * np.eye(10, dtype=np.int64)
    cm[6] = 0  # Logs absent
    write_csv(root / artifacts.CONFUSION, [["truth/prediction", *NAMES], *([n, *r] for n, r in zip(NAMES, cm.tolist()))])
    stats = {n: {"pixels": int(p), "share": float(p / 1e6), "weight": float(1e3 / p)}
             for n, p in zip(NAMES, rng.integers(500, 300_000, 10))}
    (root / artifacts.CLASS_STATS).parent.mkdir(parents=True, exist_ok=True)
    (root / artifacts.CLASS_STATS).write_text(json.dumps(stats))
    masks = rng.integers(0, 10, (examples, 28, 56)).astype(np.uint8)
    masks[:, :2] = 255
    np.savez(root / artifacts.EXAMPLES, images=rng.integers(0, 256, (examples, 28, 56, 3), dtype=np.uint8), masks=masks,
             preds=rng.integers(0, 10, (examples, 28, 56)).astype(np.uint8),
             names=np.array([f"{i:04d}.png" for i in range(examples)]))


@pytest.fixture
def plot_dir(tmp_path, monkeypatch):
    write_params(tmp_path / "params.yaml")
    fabricate_plot_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_plot_writes_valid_deterministic_pngs(plot_dir):
    plot.main()
    files = sorted(p.name for p in (plot_dir / artifacts.FIGURES).iterdir())
    assert files == ["all_metrics_curves.png", "class_distribution.png", "confusion_matrix.png", "lr_schedule.png",
                     "per_class_iou.png", "predictions.png"]
    first = {}
    for name in files:
        path = plot_dir / artifacts.FIGURES / name
        first[name] = path.read_bytes()
        assert first[name].startswith(PNG_SIGNATURE)
        with Image.open(path) as im:
            im.load()
            w, h = im.size
            assert 500 <= w <= 2500 and 300 <= h <= 2500, (name, im.size)
            assert len(np.unique(np.asarray(im.convert("L")))) > 10, name  # something was drawn
        assert b"Software" not in first[name] and b"matplotlib" not in first[name]
    plot.main()
    assert all((plot_dir / artifacts.FIGURES / n).read_bytes() == b for n, b in first.items())


def test_plot_dpi_comes_from_params(plot_dir):
    write_params(plot_dir / "params.yaml", {"plot.dpi": 30})
    plot.main()
    with Image.open(plot_dir / artifacts.FIGURES / "lr_schedule.png") as im:
        assert im.size == (7 * 30, 4 * 30)  # the 7x4 inch figure


def test_plot_names_missing_or_mismatched_inputs(plot_dir):
    (plot_dir / artifacts.HISTORY / "val/iou.tsv").unlink()
    with pytest.raises(PipelineError, match="val/iou.tsv: not found"):
        plot.main()
    fabricate_plot_inputs(plot_dir)
    write_csv(plot_dir / artifacts.PER_CLASS, [["class", "iou"], ["Sky", 0.9]])
    with pytest.raises(PipelineError, match=r"per_class.csv: missing columns \['dice'"):
        plot.main()
    fabricate_plot_inputs(plot_dir)
    stats = json.loads((plot_dir / artifacts.CLASS_STATS).read_text())
    stats["Flowers"] = stats.pop("Logs")
    (plot_dir / artifacts.CLASS_STATS).write_text(json.dumps(stats))
    with pytest.raises(PipelineError, match=r"class_stats.json: classes \['Flowers'\] are not in params"):
        plot.main()


def test_colorize_and_overlay():
    mask = np.array([[0, 1, 9], [6, 255, 3]], dtype=np.uint8)
    rgb = colorize(mask)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 3, 3)
    np.testing.assert_array_equal(rgb[0], PALETTE[[0, 1, 9]])
    np.testing.assert_array_equal(rgb[1], [PALETTE[6], IGNORE_COLOR, PALETTE[3]])
    image = np.full((2, 3, 3), 200, dtype=np.uint8)
    out = overlay(image, mask, alpha=0.5)
    np.testing.assert_array_equal(out[1, 1], image[1, 1])  # ignored pixel keeps the image
    np.testing.assert_array_equal(out[0, 0], np.round((200 + PALETTE[0].astype(float)) / 2))
    assert len({tuple(c) for c in palette(14)}) == 14  # extra classes get their own colours


@pytest.fixture
def one_thread(monkeypatch):
    # Tiny forwards: two threads only add contention on a shared 2-core machine (stages call configure_cpu).
    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def trained(tmp_path, tiny_dataset, monkeypatch, one_thread):
    """A project folder after `train` on the tiny dataset: random heads saved as best (epoch 2) and final (epoch 3)."""
    params = load_params(write_params(tmp_path / "params.yaml", {
        **TINY, "data.root": str(tiny_dataset.root), "train.device": "cpu", "train.amp": False,
        "evaluate.batch_size": 2, "evaluate.examples": 2, "plot.dpi": 30}))
    (tmp_path / "data").mkdir()
    (tmp_path / "data/prepared").symlink_to(tiny_dataset.prepared)
    names = params.data.class_names
    weights = {n: 0.5 + 0.25 * i for i, n in enumerate(names)}
    (tmp_path / "data/class_weights.json").write_text(json.dumps({
        "method": "inverse_frequency", "max_weight": 5.0, "classes": names, "counts": {n: 1 for n in names},
        "shares": {n: 0.1 for n in names}, "weights": weights}))
    (tmp_path / "models").mkdir()
    for seed, epoch, name in [(1, 2, "best"), (2, 3, "final")]:
        torch.manual_seed(seed)
        segmenter = build_model(params.model, params.data.num_classes)
        torch.save(head_checkpoint(segmenter, params, epoch, 0.1), tmp_path / f"models/{name}.pt")
    fabricate_plot_inputs(tmp_path, epochs=3)
    monkeypatch.chdir(tmp_path)
    return tmp_path, params, torch.tensor(list(weights.values()))


def reference_scores(params, split, weights):
    """Predictions, pixel-weighted loss and per-class IoU of models/best.pt, without offroad.metrics."""
    segmenter = load_segmenter(Path("models/best.pt"), params.model, params.data.class_names, "cpu")[0]
    with torch.no_grad():
        logits = segmenter(torch.from_numpy(np.array(split.images)))
    target = torch.from_numpy(np.array(split.masks)).long()
    loss = F.cross_entropy(logits, target, weight=weights, ignore_index=255)  # over the whole split at once
    pred, gt = logits.argmax(1).numpy(), target.numpy()
    valid = gt != 255
    ious = {}
    for c, name in enumerate(params.data.class_names):
        if (gt[valid] == c).any():
            ious[name] = ((pred == c) & (gt == c)).sum() / (((pred == c) | (gt == c)) & valid).sum()
    return pred, float(loss), ious, (pred == gt)[valid].mean()


def test_evaluate_writes_dataset_level_metrics_then_plot_draws_them(trained, tiny_dataset):
    root, params, weights = trained
    evaluate.main()
    scored = json.loads((root / artifacts.EVAL_METRICS).read_text())
    assert (scored["epoch"], scored["val"]["images"], scored["test"]["images"]) == (2, 3, 4)
    assert all(isinstance(v, (int, float)) for s in ("val", "test") for v in scored[s].values())  # numbers only
    val_pred, val_loss, val_ious, _ = reference_scores(params, tiny_dataset.val, weights)
    assert scored["val"]["loss"] == pytest.approx(val_loss, abs=1e-5)
    assert scored["val"]["miou"] == pytest.approx(np.mean(list(val_ious.values())), abs=1e-5)
    report = scored["test"]  # the held-out split: the plots and examples show it
    pred, loss, ious, accuracy = reference_scores(params, tiny_dataset.test, weights)
    assert report["loss"] == pytest.approx(loss, abs=1e-5)
    assert report["pixel_accuracy"] == pytest.approx(accuracy, abs=1e-5)
    assert report["miou"] == pytest.approx(np.mean(list(ious.values())), abs=1e-5)
    with open(root / artifacts.PER_CLASS, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["class"] for r in rows] == sorted(ious, key=lambda n: -ious[n])  # the test split's, by IoU
    assert [float(r["iou"]) for r in rows] == pytest.approx([ious[r["class"]] for r in rows], abs=1e-5)
    cm, cm_names = artifacts.read_confusion(root / artifacts.CONFUSION)
    assert cm_names == params.data.class_names
    assert cm.sum() == (np.array(tiny_dataset.test.masks) != 255).sum()
    names, per_image = artifacts.read_per_image(params.data.class_names, root / artifacts.PER_IMAGE["test"])
    assert names == tiny_dataset.test.names
    val_names, val_per_image = artifacts.read_per_image(params.data.class_names, root / artifacts.PER_IMAGE["val"])
    assert val_names == tiny_dataset.val.names and val_per_image.sum() == (np.array(tiny_dataset.val.masks) != 255).sum()
    gt = np.array(tiny_dataset.test.masks)
    for i in range(len(names)):  # each image's matrix, counted here from its predictions
        labelled = gt[i] != 255
        expected = np.zeros_like(per_image[i])
        np.add.at(expected, (gt[i][labelled], pred[i][labelled]), 1)
        np.testing.assert_array_equal(per_image[i], expected)
    np.testing.assert_array_equal(per_image.sum(0), cm)
    low, high = bootstrap.intervals(per_image)["miou"]  # the interval of these very images
    assert (report["miou_low"], report["miou_high"]) == pytest.approx((low, high), abs=1e-5)
    assert low <= report["miou"] <= high and set(report) == {"miou", "miou_low", "miou_high", "mdice",
                                                             "pixel_accuracy", "mean_class_accuracy", "loss", "images"}
    with np.load(root / artifacts.EXAMPLES) as z:
        np.testing.assert_array_equal(z["images"], tiny_dataset.test.images[:2])
        np.testing.assert_array_equal(z["masks"], tiny_dataset.test.masks[:2])
        np.testing.assert_array_equal(z["preds"], pred[:2])
        assert list(z["names"]) == tiny_dataset.test.names[:2]
    examples_bytes = (root / artifacts.EXAMPLES).read_bytes()
    table = (root / artifacts.EVAL_TABLE).read_text()
    table_mious = [float(line.split()[-1]) for line in table.splitlines() if line.startswith("Mean IoU")]
    assert table_mious == pytest.approx([report["miou"], scored["val"]["miou"]], abs=1e-4)  # test first
    assert "    3*" in table  # best epoch of the history

    evaluate.main()
    assert (root / artifacts.EXAMPLES).read_bytes() == examples_bytes
    plot.main()
    assert len(list((root / artifacts.FIGURES).glob("*.png"))) == 6


def test_evaluate_uses_the_checkpoint_params_choose(trained):
    root, _, _ = trained
    write_params(root / "params.yaml", {**TINY, "train.device": "cpu", "train.checkpoint": "final",
                                        "evaluate.examples": 0})
    evaluate.main()
    report = json.loads((root / artifacts.EVAL_METRICS).read_text())
    assert report["epoch"] == 3  # final.pt's; best.pt is epoch 2
    with np.load(root / artifacts.EXAMPLES) as z:
        assert z["images"].shape == (0, 56, 112, 3)
    (root / "models/final.pt").unlink()
    with pytest.raises(PipelineError, match="final.pt: checkpoint not found"):
        evaluate.main()


def decode_colors(rgb: np.ndarray) -> np.ndarray:
    """Colour mask -> class ids (255 where the colour is not a class colour)."""
    ids = np.full(rgb.shape[:2], 255, np.uint8)
    for c, color in enumerate(PALETTE):
        ids[(rgb == color).all(-1)] = c
    return ids


def test_predict_writes_one_mask_per_image_and_scores_them(trained, tiny_dataset, capsys):
    root, params, _ = trained
    images = tiny_dataset.root / "val" / "Color_Images"
    predict.main(["--images", str(images), "--out", "out"])
    sources = sorted(images.glob("*.png"))
    assert sorted(p.name for p in (root / "out/masks").iterdir()) == [p.name for p in sources]
    assert sorted(p.name for p in (root / "out/overlays").iterdir()) == [p.name for p in sources]
    segmenter = load_segmenter(Path("models/best.pt"), params.model, params.data.class_names, "cpu")[0]
    assert tiny_dataset.val.names == [p.name for p in sources]
    lut, correct, total = class_lut(params.data), 0, 0
    for src, prepared in zip(sources, tiny_dataset.val.images):
        with Image.open(src) as im:
            w, h = im.size
        with Image.open(root / "out/masks" / src.name) as im:
            assert im.size == (w, h)
            pred = decode_colors(np.asarray(im.convert("RGB")))
        with Image.open(root / "out/overlays" / src.name) as im:
            assert im.size == (2 * w, h)
        with torch.no_grad():  # the model sees the image as prepare resizes it; its output is scaled back by nearest
            small = segmenter(torch.from_numpy(np.array(prepared))[None]).argmax(1)[0].to(torch.uint8).numpy()
        assert len(np.unique(small)) > 1
        rows, cols = (2 * np.arange(h) + 1) * small.shape[0] // (2 * h), (2 * np.arange(w) + 1) * small.shape[1] // (2 * w)
        np.testing.assert_array_equal(pred, small[np.ix_(rows, cols)])  # each pixel: the label at its centre
        gt = map_mask(read_mask(tiny_dataset.root / "val/Segmentation" / src.name), lut, src)
        correct += (pred == gt)[gt != 255].sum()
        total += (gt != 255).sum()
    metrics = json.loads((root / "out/metrics.json").read_text())  # Segmentation/ beside the images
    assert metrics["images"] == len(sources)
    assert metrics["pixel_accuracy"] == pytest.approx(correct / total, abs=1e-5)
    assert "Mean IoU" in capsys.readouterr().out


def test_predict_without_masks_and_bad_input(trained, tiny_dataset):
    root, _, _ = trained
    folder = root / "photos"
    folder.mkdir()
    with pytest.raises(PipelineError, match="photos: no images"):
        predict.main(["--images", str(folder), "--out", "out"])
    with Image.open(next((tiny_dataset.root / "val/Color_Images").glob("*.png"))) as im:
        im.crop((0, 0, 90, 50)).convert("RGB").save(folder / "scene.jpg")
    predict.main(["--images", str(folder), "--out", "out"])
    assert [p.name for p in (root / "out/masks").iterdir()] == ["scene.png"]
    with Image.open(root / "out/masks/scene.png") as im:
        assert im.size == (90, 50)
    assert not (root / "out/metrics.json").exists()
    with pytest.raises(PipelineError, match="nope.pt: checkpoint not found"):
        predict.main(["--images", str(folder), "--out", "out", "--checkpoint", "models/nope.pt"])
    with pytest.raises(PipelineError, match="models: is a folder, not a checkpoint file"):
        predict.main(["--images", str(folder), "--out", "out", "--checkpoint", "models"])
    labels = root / "labels"  # the Segmentation folder given as --images
    labels.mkdir()
    cv2.imwrite(str(labels / "scene.png"), np.full((50, 90), 7100, np.uint16))
    with pytest.raises(PipelineError, match="scene.png: a 16-bit single-channel PNG is a mask of class ids"):
        predict.main(["--images", str(labels), "--out", "labelled"])
    assert not (root / "labelled").exists()
    with pytest.raises(PipelineError, match="no mask for 1 image"):
        predict.main(["--images", str(folder), "--out", "out", "--masks", str(root / "models")])


def test_predict_again_into_the_same_folder_replaces_the_earlier_run_whole(trained, tiny_dataset):
    root, _, _ = trained
    scenes = root / "scenes"
    shutil.copytree(tiny_dataset.root / "val", scenes)
    predict.main(["--images", str(scenes / "Color_Images"), "--out", "out"])
    first = sorted(p.name for p in (root / "out/masks").iterdir())
    kept = first[0]
    for name in first[1:]:  # fewer images, no masks: the earlier masks, overlays and scores must not stay
        (scenes / "Color_Images" / name).unlink()
    shutil.rmtree(scenes / "Segmentation")
    predict.main(["--images", str(scenes / "Color_Images"), "--out", "out"])
    assert [p.name for p in (root / "out/masks").iterdir()] == [kept]
    assert [p.name for p in (root / "out/overlays").iterdir()] == [kept]
    assert not (root / "out/metrics.json").exists()
    assert sorted(p.name for p in (root / "out").iterdir()) == ["masks", "overlays"]


def test_predict_refuses_params_of_another_image_size_than_the_checkpoint_s(trained, tiny_dataset):
    root, _, _ = trained
    other = write_params(root / "other.yaml", {**TINY, "data.image_size": [224, 112], "train.device": "cpu"})
    with pytest.raises(PipelineError, match=r"models/best.pt was trained at data.image_size \[112, 56\], "
                                            r".*other.yaml has \[224, 112\]: give the params it was trained with"):
        predict.main(["--images", str(tiny_dataset.root / "val/Color_Images"), "--out", "out", "--params", str(other)])
    assert not (root / "out").exists()


def drawn_figures(monkeypatch):
    """Run the plot stage, keeping the Figure objects it saves by file name."""
    from offroad import figures
    drawn = {}
    monkeypatch.setattr(figures, "save", lambda fig, path, dpi: drawn.setdefault(path.name, fig))
    plot.main()
    return drawn


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_plot_draws_the_numbers_of_its_inputs(plot_dir, monkeypatch):
    drawn = drawn_figures(monkeypatch)
    history = history_rows(plot_dir / artifacts.LIVE)
    column = {k: [float(r[k]) for r in history] for k in history[0]}
    best = max(history, key=lambda r: float(r["val_iou"]))["epoch"]

    axes = drawn["all_metrics_curves.png"].axes
    assert [ax.get_title() for ax in axes] == ["Loss", "Mean IoU", "Mean Dice", "Pixel accuracy"]
    for ax, key, scale in zip(axes, ["loss", "iou", "dice", "acc"], [1, 1, 1, 100]):
        train, val, marker = ax.get_lines()
        for line, side in [(train, "train"), (val, "val")]:
            assert line.get_label() == side
            np.testing.assert_allclose(line.get_xdata(), column["epoch"])
            np.testing.assert_allclose(line.get_ydata(), np.array(column[f"{side}_{key}"]) * scale)
        assert list(marker.get_xdata()) == [float(best)] * 2 and f"best epoch {best} " in marker.get_label()

    lr_line, = drawn["lr_schedule.png"].axes[0].get_lines()
    np.testing.assert_allclose(lr_line.get_ydata(), column["lr"])

    per_class = read_rows(plot_dir / artifacts.PER_CLASS)
    ious = {r["class"]: float(r["iou"]) for r in per_class}
    ax = drawn["per_class_iou.png"].axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == sorted(ious, key=lambda n: ious[n])  # best on top
    np.testing.assert_allclose([b.get_width() for b in ax.patches], [ious[n] for n in labels])
    assert ax.get_lines()[0].get_xdata()[0] == pytest.approx(np.mean(list(ious.values())))

    cm = np.array([[float(v) for v in list(r.values())[1:]] for r in read_rows(plot_dir / artifacts.CONFUSION)])
    shown = drawn["confusion_matrix.png"].axes[0].get_images()[0].get_array()
    for i in range(len(NAMES)):
        if cm[i].sum():
            np.testing.assert_allclose(shown[i], 100 * cm[i] / cm[i].sum())
        else:
            assert np.isnan(np.asarray(shown[i], float)).all()  # Logs: absent

    stats = json.loads((plot_dir / artifacts.CLASS_STATS).read_text())
    share_ax, weight_ax = drawn["class_distribution.png"].axes
    order = sorted(stats, key=lambda n: stats[n]["share"])
    np.testing.assert_allclose([b.get_width() for b in share_ax.patches], [100 * stats[n]["share"] for n in order])
    np.testing.assert_allclose([b.get_width() for b in weight_ax.patches], [stats[n]["weight"] for n in order])

    with np.load(plot_dir / artifacts.EXAMPLES) as z:
        examples = {k: z[k] for k in z.files}
    axes = drawn["predictions.png"].axes
    for i in range(len(examples["images"])):
        image, truth, pred, _ = (ax.get_images()[0].get_array() for ax in axes[4 * i:4 * i + 4])
        np.testing.assert_array_equal(image, examples["images"][i])
        np.testing.assert_array_equal(truth, colorize(examples["masks"][i], len(NAMES)))
        np.testing.assert_array_equal(pred, colorize(examples["preds"][i], len(NAMES)))


def outputs(root: Path, *folders: str) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for f in folders for p in sorted((root / f).rglob("*"))
            if p.is_file()}


def full_disk(path):
    """An atomic write of `path` whose disk fills up."""
    with atomic.atomic_path(path) as tmp:
        tmp.write_bytes(b"half")
        raise OSError(28, "No space left on device", str(tmp))


def test_evaluate_and_plot_replace_their_outputs_all_or_none(trained, monkeypatch):
    root, _, _ = trained
    evaluate.main()
    plot.main()
    before = outputs(root, "metrics", "plots")
    write_params(root / "params.yaml", {**TINY, "train.device": "cpu", "train.checkpoint": "final"})
    with monkeypatch.context() as m:  # the disk fills up at the last output, after the other five are written
        m.setattr(artifacts, "write_examples", lambda *a, **k: full_disk(root / artifacts.EXAMPLES))
        with pytest.raises(PipelineError, match="examples.npz: cannot write"):
            evaluate.main()
    assert outputs(root, "metrics", "plots") == before
    assert not [p for p in root.rglob(".*.tmp")]

    real_save = figures.save

    def save(fig, path, dpi):
        if path.name == "predictions.png":
            full_disk(path)
        real_save(fig, path, dpi)

    with monkeypatch.context() as m:
        m.setattr(figures, "save", save)
        with pytest.raises(PipelineError, match="predictions.png: cannot write"):
            plot.main()
    assert outputs(root, "metrics", "plots") == before
    evaluate.main()  # then a run that succeeds replaces the whole set
    assert json.loads((root / artifacts.EVAL_METRICS).read_text())["epoch"] == 3  # final.pt's


def test_predict_never_writes_into_pipeline_folders_unless_forced(trained, tiny_dataset):
    root, _, _ = trained
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")  # what the pipeline reads and writes
    images = root / "scenes"
    shutil.copytree(tiny_dataset.root / "val/Color_Images", images)
    for out in ("plots/images", "dvclive", "data/prepared/test"):
        with pytest.raises(PipelineError, match=rf"--out {out}: would write {out}/masks \(the pipeline reads or "
                                                rf"writes it\); choose another folder, or add --force"):
            predict.main(["--images", str(images), "--out", out])
        assert not (root / out / "masks").exists()
    predict.main(["--images", str(images), "--out", "plots/images", "--force"])
    assert len(list((root / "plots/images/masks").iterdir())) == len(list(images.iterdir()))


def test_predict_stopped_by_a_bad_image_keeps_the_previous_run_whole(trained, tiny_dataset):
    root, _, _ = trained
    folder = root / "scenes"
    shutil.copytree(tiny_dataset.root / "val", folder)
    predict.main(["--images", str(folder / "Color_Images"), "--out", "out", "--checkpoint", "models/best.pt"])
    before = outputs(root, "out")
    assert json.loads((root / "out/metrics.json").read_text())["checkpoint"] == "models/best.pt"
    last = sorted((folder / "Color_Images").iterdir())[-1]
    last.write_bytes(b"not a png")
    with pytest.raises(PipelineError, match=f"{last.name}: cannot decode image"):
        predict.main(["--images", str(folder / "Color_Images"), "--out", "out", "--checkpoint", "models/final.pt"])
    assert outputs(root, "out") == before
