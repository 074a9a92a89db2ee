"""Stage `plot`: the PNGs a reviewer looks at, drawn from the train and evaluate outputs."""
from __future__ import annotations

from offroad import artifacts, atomic, figures
from offroad.config import load_params
from offroad.errors import PipelineError, run_cli
from offroad.visualize import palette


def main() -> None:
    params = load_params()
    atomic.check_writable(artifacts.FIGURES)
    names, dpi = params.data.class_names, params.plot.dpi
    colors = dict(zip(names, palette(len(names))))
    history, per_class, stats = artifacts.read_history(), artifacts.read_per_class(), artifacts.read_class_stats()
    cm, cm_names = artifacts.read_confusion()
    if cm_names != names:
        raise PipelineError(f"{artifacts.CONFUSION}: classes {cm_names} differ from params data.classes {names}")
    for path, found in [(artifacts.PER_CLASS, [r["class"] for r in per_class]), (artifacts.CLASS_STATS, list(stats))]:
        unknown = sorted(set(found) - set(names))
        if unknown:
            raise PipelineError(f"{path}: classes {unknown} are not in params data.classes {names}")
    drawn = {
        "all_metrics_curves.png": figures.metrics_curves(history),
        "per_class_iou.png": figures.per_class_iou(per_class, colors),
        "lr_schedule.png": figures.lr_schedule(history),
        "confusion_matrix.png": figures.confusion_heatmap(cm, names),
        "class_distribution.png": figures.class_distribution(stats, colors),
        "predictions.png": figures.predictions(artifacts.read_examples(), names),
    }
    with atomic.together():  # one set: all new or all as before
        for filename, fig in drawn.items():
            figures.save(fig, artifacts.FIGURES / filename, dpi)
    print(f"plot: wrote {len(drawn)} PNGs to {artifacts.FIGURES}/")


if __name__ == "__main__":
    run_cli(main)
