"""Device, precision and CPU settings: the CPU fallback of the GPU code paths."""
import os

import pytest
import torch

from offroad import launch
from offroad.errors import PipelineError
from offroad.runtime import LAUNCHER_VARS, autocast, configure_cpu, init_distributed, resolve_device
from tests.conftest import make_params


def test_auto_device_falls_back_to_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(PipelineError, match=r"'cuda:1' but no CUDA device is available \(use 'auto' or 'cpu'\)"):
        resolve_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


def test_amp_is_bf16_autocast_on_the_cpu():
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with autocast(torch.device("cpu"), True):
        assert (a @ b).dtype == torch.bfloat16
    with autocast(torch.device("cpu"), False):
        assert (a @ b).dtype == torch.float32


def test_configure_cpu_uses_every_core_unless_told(monkeypatch):
    threads = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        torch.set_num_threads(1)
        configure_cpu()
        assert torch.get_num_threads() == os.cpu_count()
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        configure_cpu()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


def test_configure_cpu_flushes_denormals():
    """fp32 weight gradients meet denormals, which x86 cores compute in microcode (a 400 ms convolution step
    instead of 31 ms): configure_cpu flushes them to zero."""
    try:
        configure_cpu()
        assert (torch.full((4,), 1e-30) * 1e-10 == 0).all()
    finally:
        torch.set_flush_denormal(False)
    assert (torch.full((4,), 1e-30) * 1e-10 > 0).all()  # the same product, kept as a denormal


def test_a_stray_world_size_is_named_not_joined(monkeypatch):
    for name in ("WORLD_SIZE", *LAUNCHER_VARS):
        monkeypatch.delenv(name, raising=False)
    assert init_distributed(torch.device("cpu"))[0].world == 1
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(PipelineError, match="WORLD_SIZE=1 is set in the environment without RANK, LOCAL_RANK, "
                                            "MASTER_ADDR, MASTER_PORT: .* unset WORLD_SIZE"):
        init_distributed(torch.device("cpu"))
    with pytest.raises(PipelineError, match="WORLD_SIZE=1 is set"):
        launch.needed(make_params({"train.processes": 2}).train)


@pytest.mark.parametrize("endpoint", ["node0:70000", "node0:0", "node0", ":29500", "node0:port"])
def test_a_multi_node_endpoint_needs_a_host_and_a_port(monkeypatch, endpoint):
    monkeypatch.setenv(launch.RDZV_ENDPOINT, endpoint)
    with pytest.raises(launch.LaunchError, match=f"set {launch.RDZV_ENDPOINT}=HOST:PORT .* got '{endpoint}'"):
        launch.check(make_params({"train.nodes": 2}).train, torch.device("cpu"))


@pytest.mark.parametrize("name, value", [("WORLD_SIZE", "abc"), ("RANK", "-1"), ("LOCAL_RANK", "0x1"),
                                         ("WORLD_SIZE", "0")])
def test_launcher_variables_that_are_not_counts_are_named(monkeypatch, name, value):
    for var, default in {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "localhost",
                         "MASTER_PORT": "29511"}.items():
        monkeypatch.setenv(var, default)
    monkeypatch.setenv(name, value)
    with pytest.raises(PipelineError, match=f"{name}={value!r}|WORLD_SIZE=0"):
        init_distributed(torch.device("cpu"))
