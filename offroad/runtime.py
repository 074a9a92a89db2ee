"""Where and how the model runs: device, precision, process group, CPU threads and allocator."""
from __future__ import annotations

import contextlib
import ctypes
import os
import platform
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from offroad.config import Params
from offroad.errors import PipelineError

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # train.amp_dtype


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"train.device is {name!r} but no CUDA device is available (use 'auto' or 'cpu')")
    return device


@dataclass(frozen=True)
class Dist:
    """This process's place in the process group (rank 0 of 1 without a launcher). `local` is its rank on
    its node: local rank 0 writes the node's outputs (every node its own copy, see README "GPUs")."""
    rank: int = 0
    world: int = 1
    local: int = 0

    @property
    def main(self) -> bool:
        return self.local == 0

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def gather(self, obj):
        """Every rank's `obj`, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def from_rank0(self, make):
        """`make()` run on rank 0 only, its result on every rank."""
        if self.world == 1:
            return make()
        box = [make() if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]


@dataclass(frozen=True)
class Run:
    """What every model pass needs to know besides the model and the data."""
    device: torch.device
    amp: bool
    num_classes: int
    ignore_index: int
    dist: Dist = field(default_factory=Dist)
    amp_dtype: torch.dtype = torch.bfloat16

    @classmethod
    def from_params(cls, params: Params, device: torch.device, dist: Dist = Dist()) -> "Run":
        t, data = params.train, params.data
        return cls(device, t.amp, data.num_classes, data.ignore_index, dist, AMP_DTYPES[t.amp_dtype])

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.amp, self.amp_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling for fp16 autocast (its gradients underflow without it); a no-op otherwise."""
        return torch.amp.GradScaler(self.device.type, enabled=self.amp and self.amp_dtype == torch.float16)


def init_distributed(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the launcher's process group if there is one (offroad.launch or torchrun): nccl on CUDA (the GPU
    of the local rank), gloo on the CPU."""
    if "WORLD_SIZE" not in os.environ:
        return Dist(), device
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    local = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    return Dist(dist.get_rank(), dist.get_world_size(), local), device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, enabled: bool, dtype: torch.dtype = torch.bfloat16) -> contextlib.AbstractContextManager:
    """Mixed precision on CPU and CUDA: bf16 (Ampere and newer GPUs, CPUs with AVX-512 bf16 or AMX), or fp16
    with a grad scaler (pre-Ampere GPUs such as the T4 and V100, where bf16 is emulated)."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return set()
    line = next((line for line in cpuinfo.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def choose_attention(setting: str, flags: set[str] | None = None) -> tuple[str, str]:
    """The attention kernel for model.attention (auto | sdpa | matmul) and why: decided by the CPU's
    capabilities, never by timing, so a run does not change kernels (and bf16 roundings) from run to run.
    auto: the hand-written matmul attention where bf16 runs on AVX-512 bf16 without AMX (AMD EPYC: 2.6x
    SDPA's speed), SDPA where AMX tiles do the bf16 matmuls (Intel Xeon: SDPA 37 % faster) and elsewhere."""
    if setting != "auto":
        return setting, "model.attention"
    flags = cpu_flags() if flags is None else flags
    if "amx_bf16" in flags:
        return "sdpa", "auto: CPU with AMX"
    if "avx512_bf16" in flags:
        return "matmul", "auto: CPU with AVX-512 bf16, no AMX"
    return "sdpa", "auto: CPU without AVX-512 bf16"


def configure_cpu() -> None:
    """The node's cores shared by its processes (LOCAL_WORLD_SIZE, set by a launcher) unless the user set
    OMP_NUM_THREADS; glibc malloc keeps freed memory.

    glibc's default hands the memory of large tensors back to the OS and page-faults it in again on the next
    forward until its thresholds adapt: on the 2-core test machine ViT-S bf16 forwards ran at 9-14 images/s
    instead of 15 (4x the page faults); a train run was 2-4 % slower.
    """
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    if platform.libc_ver()[0] == "glibc":
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)  # blocks up to 32 MiB come from the heap (old glibc's maximum)
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)  # and freeing them does not hand the heap back
