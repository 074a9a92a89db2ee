"""Device, precision, thread and memory-allocator settings shared by the stages that run the model."""
from __future__ import annotations

import contextlib
import ctypes
import os
import platform

import torch

from stages.errors import PipelineError

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"train.device is {name!r} but no CUDA device is available (use 'auto' or 'cpu')")
    return device


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CPU and CUDA (bf16 needs no grad scaler)."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def configure_cpu() -> None:
    """One intra-op thread per core unless the user set OMP_NUM_THREADS; glibc malloc keeps freed memory.

    glibc's default hands the memory of large tensors back to the OS and page-faults it in again on the next
    forward until its thresholds adapt: on the 2-core test machine ViT-S bf16 forwards ran at 9-14 images/s
    instead of 15 (4x the page faults); a train run was 2-4 % slower.
    """
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(os.cpu_count() or 1)
    if platform.libc_ver()[0] == "glibc":
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)  # blocks up to 32 MiB come from the heap (old glibc's maximum)
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)  # and freeing them does not hand the heap back
