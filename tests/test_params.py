"""params.yaml validation: every mistake names its key."""
import copy
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from offroad.config import ParamsError, load_params, validate

REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(REPO_PARAMS.read_text())


def edited(raw: dict, key: str, value) -> dict:
    out = copy.deepcopy(raw)
    *parents, last = key.split(".")
    node = out
    for p in parents:
        node = node[int(p)] if p.isdigit() else node[p]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return out


DELETE = object()


def test_repo_params_are_the_phase2_recipe():
    p = load_params(REPO_PARAMS)
    assert (p.optimizer.name, p.optimizer.lr, p.optimizer.weight_decay) == ("adamw", 5e-4, 1e-4)
    assert (p.scheduler.name, p.scheduler.min_lr) == ("cosine", 1e-6)
    assert (p.train.epochs, p.train.early_stopping_patience, p.train.checkpoint) == (30, 10, "best")
    assert p.augment.enabled and p.loss.class_weighted and (p.train.amp, p.train.amp_dtype) == ("auto", "auto")
    assert p.data.image_size == (476, 266)
    assert p.data.class_names == ["Background", "Trees", "Lush Bushes", "Dry Grass", "Dry Bushes",
                                  "Ground Clutter", "Logs", "Rocks", "Landscape", "Sky"]
    assert 600 in p.data.classes[0].raw  # Flowers folded into Background, explicitly


def test_string_numbers_are_floats(raw):
    p = validate(edited(raw, "optimizer.lr", "5e-4"))
    assert p.optimizer.lr == pytest.approx(5e-4) and isinstance(p.optimizer.lr, float)


@pytest.mark.parametrize("key, value, expected", [
    ("optimizer.lrr", 1.0, "unknown key 'optimizer.lrr' (did you mean 'lr'?)"),
    ("optimizer.lr", "fast", "'optimizer.lr': expected a number"),
    ("optimizer.lr", True, "'optimizer.lr': expected a number"),
    ("optimizer.lr", -1.0, "'optimizer.lr': Input should be greater than 0"),
    ("optimizer.lr", 0.0, "'optimizer.lr'"),
    ("optimizer.name", "adam", "'optimizer.name': Input should be 'sgd' or 'adamw'"),
    ("train.epochs", 0, "'train.epochs': Input should be greater than or equal to 1"),
    ("train.epochs", 2.5, "'train.epochs'"),
    ("train.batch_size", -4, "'train.batch_size'"),
    ("train.early_stopping_patience", -1, "'train.early_stopping_patience'"),
    ("train.device", "gpu", "'train.device'"),
    ("train.epochs", DELETE, "missing key 'train.epochs'"),
    ("data.image_size", [470, 266], "image_size [470, 266] must be multiples of 14"),
    ("data.classes", [], "'data.classes'"),
    ("data.classes.1.name", "Background", "duplicate class names ['Background']"),
    ("data.classes.1.raw", [0], "raw ids [0] are mapped more than once"),
    ("data.classes.0.nam", "x", "unknown key 'data.classes.0.nam' (did you mean 'name'?)"),
    ("data.classes.2.name", "Land\nscape", "'data.classes.2.name': a class name is one line of printable characters"),
    ("data.classes.2.name", "Dry\tGrass", "'data.classes.2.name': a class name is one line"),
    ("data.ignore_index", 3, "ignore_index 3 collides with a class index"),
    ("model.backbone", "dinov2_vits16", "'model.backbone'"),
    ("scheduler.min_lr", 1.0, "scheduler.min_lr 1.0 exceeds optimizer.lr"),
    ("augment.hflip", 1.5, "'augment.hflip': Input should be less than or equal to 1"),
    ("loss.name", "dice", "'loss.name'"),
    ("nonsense", {}, "unknown key 'nonsense'"),
    # infinities and sizes that would only fail later, as NaN images, `Infinity` in JSON or a huge allocation
    ("augment.color_jitter.brightness", float("inf"), "'augment.color_jitter.brightness': Input should be less than or equal to 1 (got inf)"),
    ("augment.color_jitter.brightness", float("nan"), "'augment.color_jitter.brightness': Input should be greater than or equal to 0 (got nan)"),
    ("optimizer.weight_decay", float("inf"), "'optimizer.weight_decay': Input should be less than or equal to 10 (got inf)"),
    ("class_weights.max_weight", float("inf"), "'class_weights.max_weight': Input should be less than or equal to 1000000 (got inf)"),
    ("plot.dpi", 100_000, "'plot.dpi': Input should be less than or equal to 600"),
    ("train.seed", 10**18, "'train.seed': Input should be less than or equal to 4294967295"),
    ("synthetic.width", 60_000, "'synthetic.width': Input should be less than or equal to 7680"),
    ("data.image_size", [476, 266_000], "'data.image_size.1': Input should be less than or equal to 4096"),
    ("train.epochs", 10**9, "'train.epochs': Input should be less than or equal to 10000"),
])
def test_bad_params_name_the_key(raw, key, value, expected):
    with pytest.raises(ParamsError) as err:
        validate(edited(raw, key, value), "params.yaml")
    assert expected in str(err.value)
    assert str(err.value).startswith("params.yaml: invalid params")


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "params.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ParamsError, match="expected a mapping"):
        load_params(bad)


def test_a_yaml_alias_bomb_gets_a_short_message_at_once(tmp_path):
    levels = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    levels += [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]" for i in range(8)]
    bomb = tmp_path / "params.yaml"  # 9**9 strings when expanded, ~3 GB as text
    bomb.write_text("\n".join(levels) + "\n" + REPO_PARAMS.read_text().replace("seed: 0\n", "seed: *i\n", 1))
    with pytest.raises(ParamsError) as err:
        load_params(bomb)
    assert len(str(err.value)) < 2000 and "'synthetic.seed': Input should be a valid integer" in str(err.value)


def load_in_a_child(path: Path) -> subprocess.CompletedProcess:
    """load_params(path) in a process with a time and memory limit: a regression must fail, not hang or fill
    the machine's memory."""
    code = "import sys; from offroad.config import load_params; from offroad.errors import run_cli; " \
           f"run_cli(lambda: load_params({str(path)!r}))"
    limit = lambda: resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))  # noqa: E731
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          preexec_fn=limit)


def test_params_files_that_are_not_small_regular_files_are_refused(tmp_path):
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)  # reading it would wait for a writer forever
    endless = tmp_path / "zero.yaml"
    endless.symlink_to("/dev/zero")  # reading it whole would fill the memory
    for path in (fifo, endless):
        result = load_in_a_child(path)
        assert result.returncode == 1 and f"{path.name}: not a regular file" in result.stderr
    huge = tmp_path / "huge.yaml"
    huge.write_text("# " + "x" * (1 << 20) + "\n")
    with pytest.raises(ParamsError, match="huge.yaml: larger than 1048576 bytes"):
        load_params(huge)


def test_a_key_given_twice_is_refused_not_silently_overridden(tmp_path):
    text = Path("params.yaml").read_text()
    twice = tmp_path / "params.yaml"
    twice.write_text(text.replace("  epochs: ", "  epochs: 3\n  epochs: ", 1))
    with pytest.raises(ParamsError, match="not valid YAML: .*key 'epochs' is given twice"):
        load_params(twice)
    twice.write_text(text + "train:\n  epochs: 5\n")  # a second section
    with pytest.raises(ParamsError, match="key 'train' is given twice"):
        load_params(twice)
