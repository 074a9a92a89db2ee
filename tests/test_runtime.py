"""Device, precision and CPU settings: the CPU fallback of the GPU code paths."""
import os

import pytest
import torch

from offroad.errors import PipelineError
from offroad.runtime import autocast, configure_cpu, resolve_device


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
