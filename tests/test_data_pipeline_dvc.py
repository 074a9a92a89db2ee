"""A real `dvc repro` of the data stages in a fresh git + DVC copy of the project, with tiny params."""
import json

import numpy as np

from offroad.artifacts import load_split
from tests.conftest import TINY, run_dvc, write_params

DATA_STAGES = ("synthesize", "prepare", "class_weights")


def ran(output: str) -> set[str]:
    return {stage for stage in DATA_STAGES if f"Running stage '{stage}'" in output}


def test_repro_runs_the_data_stages_and_a_weight_change_reruns_only_class_weights(repo_copy):
    write_params(repo_copy / "params.yaml", TINY)
    assert ran(run_dvc(repo_copy, "repro", "class_weights").stdout) == set(DATA_STAGES)

    train = load_split(repo_copy / "data/prepared", "train")
    assert train.images.shape == (6, 56, 112, 3) and len(load_split(repo_copy / "data/prepared", "val")) == 3
    assert len(list((repo_copy / "data/synthetic/train/Segmentation").glob("*.png"))) == 6
    first = json.loads((repo_copy / "data/class_weights.json").read_text())
    masks = np.asarray(train.masks)
    assert first["counts"] == {n: int((masks == i).sum()) for i, n in enumerate(first["classes"])}
    assert max(first["weights"].values()) == 5.0
    assert json.loads((repo_copy / "metrics/class_stats.json").read_text())["Sky"]["weight"] == first["weights"]["Sky"]

    assert json.loads(run_dvc(repo_copy, "status", "class_weights", "--json").stdout) == {}
    write_params(repo_copy / "params.yaml", {**TINY, "class_weights.max_weight": 2.5})
    assert set(json.loads(run_dvc(repo_copy, "status", "class_weights", "--json").stdout)) == {"class_weights"}
    assert ran(run_dvc(repo_copy, "repro", "class_weights").stdout) == {"class_weights"}
    second = json.loads((repo_copy / "data/class_weights.json").read_text())
    assert second["counts"] == first["counts"] and second["max_weight"] == 2.5
    assert all(abs(second["weights"][n] - first["weights"][n] / 2) < 1e-12 for n in first["classes"])
