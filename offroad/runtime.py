"""Where and how the model runs: device, precision, process group, CPU threads and allocator."""
from __future__ import annotations

import contextlib
import ctypes
import os
import platform
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from offroad.config import Params, Train
from offroad.errors import PipelineError, warn

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # train.amp_dtype
BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 AVX-512 bf16 and AMX; aarch64 BF16
# ONEDNN_MAX_CPU_ISA values that stop oneDNN short of bf16 instructions (an emulated older CPU)
NO_BF16_ISAS = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


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
    def writes_outputs(self) -> bool:
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


def cpu_runs_bf16(flags: set[str] | None = None, env: dict[str, str] | None = None,
                  capability: str | None = None) -> bool:
    """Whether bf16 matmuls run in hardware here: the CPU has the instructions, and neither
    ATEN_CPU_CAPABILITY nor ONEDNN_MAX_CPU_ISA caps torch below them. Elsewhere bf16 is emulated, ~7x slower
    than fp32 (AVX2-only AMD EPYC)."""
    flags = cpu_flags() if flags is None else flags
    env = os.environ if env is None else env
    isa = env.get("ONEDNN_MAX_CPU_ISA", env.get("DNNL_MAX_CPU_ISA", "")).upper()
    capability = torch.backends.cpu.get_cpu_capability() if capability is None else capability
    x86_capped = "avx2" in flags and capability != "AVX512"
    return bool(flags & BF16_FLAGS) and isa not in NO_BF16_ISAS and not x86_capped


def cuda_runs_bf16(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 8  # Ampere and newer


@dataclass(frozen=True)
class Precision:
    """The autocast dtype (None: fp32) and why it was chosen."""
    dtype: torch.dtype | None
    reason: str

    def __str__(self) -> str:
        name = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]
        return f"{name} ({self.reason})"


def choose_precision(train: Train, device: torch.device, native_bf16: bool | None = None) -> Precision:
    """train.amp (auto | true | false) and train.amp_dtype (auto | bf16 | fp16) on `device`, decided by the
    hardware's capabilities, never by timing. auto: bf16 where it runs natively (CPUs with AVX-512 bf16 or
    AMX, Ampere and newer GPUs), fp16 with a grad scaler on older GPUs, fp32 on other CPUs."""
    if train.amp is False:
        return Precision(None, "train.amp: false")
    cuda = device.type == "cuda"
    native = (cuda_runs_bf16(device) if cuda else cpu_runs_bf16()) if native_bf16 is None else native_bf16
    where = "GPU" if cuda else "CPU"
    if train.amp == "auto" and not cuda and not native:
        return Precision(None, "auto: CPU without native bf16")
    if train.amp_dtype != "auto":
        dtype, reason = AMP_DTYPES[train.amp_dtype], f"train.amp_dtype: {train.amp_dtype}"
    else:
        dtype = torch.bfloat16 if native or not cuda else torch.float16
        reason = f"{'auto' if train.amp == 'auto' else 'train.amp: true'}: {where} " + \
            ("with native bf16" if native else "without native bf16")
    if dtype == torch.bfloat16 and not native:
        warn(f"bf16 autocast on a {where} without native bf16 is emulated: several times slower than fp32 "
             f"(about 7x on an AVX2 CPU); train.amp: auto picks {'fp16' if cuda else 'fp32'} here")
    return Precision(dtype, reason)


@dataclass(frozen=True)
class Run:
    """What every model pass needs to know besides the model and the data."""
    device: torch.device
    amp: bool
    num_classes: int
    ignore_index: int
    dist: Dist = field(default_factory=Dist)
    amp_dtype: torch.dtype = torch.bfloat16
    precision: str = ""  # what was chosen and why, for logs and run facts

    @classmethod
    def from_params(cls, params: Params, device: torch.device, dist: Dist = Dist()) -> "Run":
        data, chosen = params.data, choose_precision(params.train, device)
        return cls(device, chosen.dtype is not None, data.num_classes, data.ignore_index, dist,
                   chosen.dtype or torch.bfloat16, str(chosen))

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.amp, self.amp_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling for fp16 autocast (its gradients underflow without it); a no-op otherwise."""
        return torch.amp.GradScaler(self.device.type, enabled=self.amp and self.amp_dtype == torch.float16)


LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # set with WORLD_SIZE by a launcher
INIT_FILE = "OFFROAD_INIT_FILE"  # one node: the process group meets in this file, on no network port


def launched() -> bool:
    """Whether a launcher (offroad.launch or torchrun) started this process; a WORLD_SIZE without the rest of
    a launcher's variables is a stray setting, and an error."""
    if "WORLD_SIZE" not in os.environ:
        return False
    missing = [v for v in LAUNCHER_VARS if v not in os.environ]
    if missing:
        raise PipelineError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} is set in the environment without "
                            f"{', '.join(missing)}: a launcher sets them together; unset WORLD_SIZE to train in "
                            "one process, or use train.processes")
    bad = [f"{v}={os.environ[v]!r}" for v in ("WORLD_SIZE", "RANK", "LOCAL_RANK") if not os.environ[v].isdigit()]
    if bad or int(os.environ["WORLD_SIZE"]) < 1:
        raise PipelineError(f"{', '.join(bad) or 'WORLD_SIZE=0'} in the environment: a launcher sets whole "
                            "numbers (WORLD_SIZE at least 1); unset them to train in one process")
    return True


def init_distributed(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the launcher's process group if there is one (offroad.launch or torchrun): nccl on CUDA (the GPU
    of the local rank), gloo on the CPU."""
    if not launched():
        return Dist(), device
    backend = "nccl" if device.type == "cuda" else "gloo"
    if INIT_FILE in os.environ:
        dist.init_process_group(backend, init_method=f"file://{os.environ[INIT_FILE]}",
                                rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    else:
        dist.init_process_group(backend)
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
    """The CPU's feature flags (Linux /proc/cpuinfo: x86 flags, aarch64 Features; empty elsewhere)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return set()
    line = next((line for line in cpuinfo.splitlines() if line.startswith(("flags", "Features"))), "")  # x86, arm
    return set(line.partition(":")[2].split())


def choose_attention(setting: str, flags: set[str] | None = None, device_type: str = "cpu") -> tuple[str, str]:
    """The attention kernel for model.attention (auto | sdpa | matmul) and why: decided by the device and the
    CPU's capabilities, never by timing, so a run does not change kernels (and bf16 roundings) from run to run.
    auto: SDPA on a GPU (its fused kernels); on a CPU the hand-written matmul attention where bf16 runs on
    AVX-512 bf16 without AMX (AMD EPYC: 2.6x SDPA's speed), SDPA where AMX tiles do the bf16 matmuls (Intel
    Xeon: SDPA 37 % faster) and elsewhere."""
    if setting != "auto":
        return setting, "model.attention"
    if device_type != "cpu":
        return "sdpa", "auto: GPU"
    flags = cpu_flags() if flags is None else flags
    if "amx_bf16" in flags:
        return "sdpa", "auto: CPU with AMX"
    if "avx512_bf16" in flags:
        return "matmul", "auto: CPU with AVX-512 bf16, no AMX"
    return "sdpa", "auto: CPU without AVX-512 bf16"


def configure_cpu() -> None:
    """The node's cores shared by its processes (LOCAL_WORLD_SIZE, set by a launcher) unless the user set
    OMP_NUM_THREADS; denormal floats flushed to zero; glibc malloc keeps freed memory.

    Denormals: in fp32 the head's weight gradients meet them, and x86 cores compute them in microcode. On an
    Intel Xeon without bf16 the stem convolution's backward took 400 ms a step instead of 31 (bf16 has no
    denormals to meet: its kernels flush them).

    glibc's default hands the memory of large tensors back to the OS and page-faults it in again on the next
    forward until its thresholds adapt: on the 2-core test machine ViT-S bf16 forwards ran at 9-14 images/s
    instead of 15 (4x the page faults); a train run was 2-4 % slower.
    """
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    torch.set_flush_denormal(True)  # before the first parallel region: its threads inherit the setting
    if platform.libc_ver()[0] == "glibc":
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)  # blocks up to 32 MiB come from the heap (old glibc's maximum)
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)  # and freeing them does not hand the heap back
