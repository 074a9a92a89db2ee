"""The train stage on a CUDA GPU: device placement, bf16/fp16 autocast, pinned memory, train.compile, nccl.

Skipped without a GPU; `python -m bench.gpu_check` runs this file on one and fails if anything here is skipped.
"""
import csv
import socket
from unittest import mock

import numpy as np
import pytest
import torch
import torch.distributed

from offroad.augment import build_augment
from offroad.data import SegmentationDataset
from offroad.runtime import Run, init_distributed
from offroad.segmenter import build_model
from offroad.training import Outputs, RunInputs, augmented_loader, fit
from tests.conftest import TINY, make_params, history_rows

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DEVICE = torch.device("cuda")
TRAIN = {**TINY, "train.epochs": 2, "train.batch_size": 3, "train.device": "cuda", "train.num_workers": 0,
         "augment.enabled": False, "loss.class_weighted": False, "optimizer.lr": 2e-3,
         "train.early_stopping_patience": 0}
COMPARED = ("train_loss", "val_loss", "val_acc")


def fit_tiny(tmp_path, tiny_dataset, dist=None, **overrides) -> tuple[list[dict], Outputs]:
    """fit on the tiny dataset with TRAIN + overrides on DEVICE (in a process group, fit trains a DDP head)."""
    params = make_params({**TRAIN, **overrides})
    torch.manual_seed(0)
    model = build_model(params.model, params.data.num_classes).to(DEVICE)
    out = Outputs.inside(tmp_path)
    run = Run.from_params(params, DEVICE) if dist is None else Run.from_params(params, DEVICE, dist)
    fit(model, params, RunInputs(tiny_dataset.train, tiny_dataset.val), run, out, log=lambda _: None)
    return [{k: float(v) for k, v in row.items()} for row in history_rows(out.live)], out


def assert_close_histories(a: list[dict], b: list[dict], abs_tol: float) -> None:
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b]
    for ra, rb in zip(a, b):
        for key in COMPARED:
            assert np.isfinite(rb[key]), (rb["epoch"], key)
            assert rb[key] == pytest.approx(ra[key], abs=abs_tol), (rb["epoch"], key)


def tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in tensors(v)]
    return []


def test_model_and_training_run_on_the_gpu_and_checkpoints_load_on_the_cpu(tmp_path, tiny_dataset):
    params = make_params(TRAIN)
    model = build_model(params.model, params.data.num_classes).to(DEVICE)
    images = torch.from_numpy(np.array(tiny_dataset.train.images[:2]))
    feats = model.features(images)  # uint8 on the CPU in, moved to the backbone's device
    logits = model.decode(feats, images.shape[1:3])
    assert feats.device.type == logits.device.type == "cuda"
    assert logits.shape == (2, params.data.num_classes, *images.shape[1:3])
    assert Run.from_params(params, DEVICE).device.type == "cuda"

    # Phase 2 path: augmented images through the loader, features on the GPU every step
    history, out = fit_tiny(tmp_path, tiny_dataset, **{"train.epochs": 1, "augment.enabled": True})
    assert len(history) == 1 and np.isfinite(history[0]["train_loss"])
    for path in (out.best, out.final):
        head = torch.load(path, weights_only=True)["head"]  # no map_location: tensors load where they were saved
        assert head and all(t.device.type == "cpu" for t in head.values()), path
    state = torch.load(out.last, weights_only=True)
    kept = tensors([state["head"], state["best_head"]])
    assert kept and all(t.device.type == "cpu" for t in kept)


def test_auto_precision_follows_the_gpu_capability(tmp_path, tiny_dataset):
    run = Run.from_params(make_params(TRAIN), DEVICE)
    ampere = torch.cuda.get_device_capability(DEVICE)[0] >= 8
    assert (run.amp, run.amp_dtype) == (True, torch.bfloat16 if ampere else torch.float16), run.precision
    assert run.grad_scaler().is_enabled() == (not ampere)
    with run.autocast():
        assert (torch.ones(2, 2, device=DEVICE) @ torch.ones(2, 2, device=DEVICE)).dtype == run.amp_dtype
    history, _ = fit_tiny(tmp_path, tiny_dataset, **{"train.epochs": 1})  # amp: auto
    assert np.isfinite(history[0]["train_loss"])


@pytest.mark.parametrize("amp_dtype", ["bf16", "fp16"])
def test_autocast_training_tracks_fp32(tmp_path, tiny_dataset, amp_dtype):
    fp32, _ = fit_tiny(tmp_path / "fp32", tiny_dataset, **{"train.amp": False})
    amp, out = fit_tiny(tmp_path / amp_dtype, tiny_dataset, **{"train.amp": True, "train.amp_dtype": amp_dtype})
    assert_close_histories(fp32, amp, abs_tol=0.02)
    scaler = torch.load(out.last, weights_only=True)["scaler"]
    if amp_dtype == "fp16":
        assert scaler["scale"] > 1  # the loss was scaled up before backward
    else:
        assert scaler is None


def test_augmented_loader_pins_batches_for_the_gpu(tiny_dataset):
    params = make_params(TRAIN)
    dataset = SegmentationDataset(tiny_dataset.train, build_augment(params.augment, params.data.ignore_index))
    for run, pinned in ((Run.from_params(params, DEVICE), True), (Run.from_params(params, torch.device("cpu")), False)):
        loader = augmented_loader(dataset, 2, run)
        loader.batch_sampler.batches = [[(0, 0), (0, 1)], [(0, 2)]]
        batches = list(loader)
        assert len(batches) == 2
        for images, masks, _ in batches:
            assert images.is_pinned() == masks.is_pinned() == pinned


def test_compiled_head_trains_like_the_plain_one(tmp_path, tiny_dataset):
    plain, plain_out = fit_tiny(tmp_path / "plain", tiny_dataset, **{"train.epochs": 1})
    with mock.patch("torch.compile", side_effect=torch.compile) as compile_:
        compiled, out = fit_tiny(tmp_path / "compiled", tiny_dataset, **{"train.epochs": 1, "train.compile": True})
    compile_.assert_called_once()
    assert_close_histories(plain, compiled, abs_tol=0.02)
    # the checkpoint holds the head's own parameter names, not the compiled wrapper's (_orig_mod.*)
    keys = [set(torch.load(p, weights_only=True)["head"]) for p in (plain_out.best, out.best)]
    assert keys[0] == keys[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_nccl_process_trains_like_no_process_group(tmp_path, tiny_dataset, monkeypatch):
    for name, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0",
                        "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    plain, _ = fit_tiny(tmp_path / "plain", tiny_dataset, **{"train.epochs": 1})
    dist, device = init_distributed(DEVICE)
    try:
        assert torch.distributed.get_backend() == "nccl"
        assert (dist.rank, dist.world, device) == (0, 1, torch.device("cuda", 0))
        with mock.patch("torch.nn.parallel.DistributedDataParallel",
                        side_effect=torch.nn.parallel.DistributedDataParallel) as ddp_:
            ddp, _ = fit_tiny(tmp_path / "ddp", tiny_dataset, dist=dist, **{"train.epochs": 1})
        ddp_.assert_called_once()
    finally:
        torch.distributed.destroy_process_group()
    assert_close_histories(plain, ddp, abs_tol=1e-3)
