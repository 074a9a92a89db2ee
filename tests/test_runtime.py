"""Device, precision and CPU settings: the CPU fallback of the GPU code paths."""
import os
import socket
import subprocess
import sys

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


@pytest.mark.parametrize("value", ["abc", "0", "-5", "1e9", "nan"])
def test_a_rendezvous_timeout_must_be_seconds(monkeypatch, value):
    monkeypatch.setenv(launch.RDZV_ENDPOINT, "node0:29500")
    monkeypatch.setenv(launch.RDZV_TIMEOUT, value)
    with pytest.raises(launch.LaunchError, match=f"{launch.RDZV_TIMEOUT}='{value}': give the seconds .* 1 to 3600"):
        launch.check(make_params({"train.nodes": 2}).train, torch.device("cpu"))


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


def test_a_multi_node_endpoint_held_by_a_silent_listener_fails_in_time_in_one_line():
    launcher = ("import torch; from offroad import launch; from tests.conftest import make_params; "
                "launch.launch(make_params({'train.nodes': 2}).train, torch.device('cpu'), 'stages.train')")
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts connections (the backlog), never answers
        endpoint = f"127.0.0.1:{silent.getsockname()[1]}"
        env = {**os.environ, launch.RDZV_ENDPOINT: endpoint, launch.RDZV_TIMEOUT: "1"}
        done = subprocess.run([sys.executable, "-c", launcher], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"offroad.launch.LaunchError: rendezvous at {endpoint}: something accepts connections "
                           "there but has not answered as torch's store in 1 s")
    assert "frame #" not in done.stderr


def test_an_unreachable_store_is_one_line_and_a_live_one_passes(monkeypatch, capfd):
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, multi_tenant=True, wait_for_workers=False)
    assert launch.hosts_here("127.0.0.1", free_port()) and not launch.hosts_here("127.0.0.1", store.port)
    assert not launch.hosts_here("192.0.2.1", free_port())  # not an address of this machine
    monkeypatch.setattr(launch, "hosts_here", lambda host, port: False)  # as on a node that does not host it
    endpoint = f"127.0.0.1:{free_port()}"
    with pytest.raises(launch.LaunchError, match=rf"rendezvous at {endpoint}: no store answered in 1 s \(The client "
                                                 r"socket has timed out .*\); start the node 127.0.0.1 names"):
        launch.check_store(endpoint, 1)
    assert "frame #" not in capfd.readouterr().err
    launch.check_store(f"127.0.0.1:{store.port}", 5)


@pytest.mark.parametrize("name, value", [("WORLD_SIZE", "abc"), ("RANK", "-1"), ("LOCAL_RANK", "0x1"),
                                         ("WORLD_SIZE", "0")])
def test_launcher_variables_that_are_not_counts_are_named(monkeypatch, name, value):
    for var, default in {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "localhost",
                         "MASTER_PORT": "29511"}.items():
        monkeypatch.setenv(var, default)
    monkeypatch.setenv(name, value)
    with pytest.raises(PipelineError, match=f"{name}={value!r}|WORLD_SIZE=0"):
        init_distributed(torch.device("cpu"))
