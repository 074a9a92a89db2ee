"""Several training processes from one command: torch's elastic launcher (what torchrun runs), one node or many.

`python -m stages.train` with `train.processes` × `train.nodes` above 1 becomes the launcher: it starts
`train.processes` workers on this node, each running the same module with WORLD_SIZE set (the worker path of
the stage). Nodes find each other through torchrun's c10d rendezvous at OFFROAD_RDZV_ENDPOINT; ranks are
assigned by it. A worker that fails stops them all (no restarts) and the launcher names its rank.

On one node nothing listens beyond loopback: the rendezvous and the process group meet in files of a private
temporary folder (torch's TCP stores have no authentication and listen on every interface), and gloo and
NCCL connect over `lo`. Several nodes need the TCP store at the endpoint: see README "GPUs".
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from datetime import timedelta
from typing import Iterator

import torch

from offroad.config import Train
from offroad.errors import PipelineError, die_with_parent
from offroad.runtime import INIT_FILE, launched

RDZV_ENDPOINT = "OFFROAD_RDZV_ENDPOINT"  # host:port of the c10d rendezvous, the same on every node
RDZV_ID = "OFFROAD_RDZV_ID"  # optional: tells apart several multi-node jobs sharing one endpoint
RDZV_TIMEOUT = "OFFROAD_RDZV_TIMEOUT"  # optional: seconds a node waits for the rendezvous store to answer
LAUNCHER_PID = "OFFROAD_LAUNCHER_PID"  # set for the workers: they die with the launcher


class LaunchError(PipelineError):
    pass


def needed(cfg: Train) -> bool:
    return cfg.processes * cfg.nodes > 1 and not launched()


def check(cfg: Train, device: torch.device) -> None:
    """A launch that cannot work fails here, before any process starts."""
    if device.type == "cuda":
        if device.index is not None:
            raise LaunchError(f"train.device is '{device}' but train.processes is {cfg.processes}: every process "
                              "takes the GPU of its local rank, use train.device 'cuda' or 'auto'")
        gpus = torch.cuda.device_count()
        if cfg.processes > gpus:
            raise LaunchError(f"train.processes is {cfg.processes} but this node has {gpus} CUDA device(s): "
                              "one process per GPU")
    if cfg.nodes > 1:
        endpoint = os.environ.get(RDZV_ENDPOINT, "")
        host, _, port = endpoint.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise LaunchError(f"train.nodes is {cfg.nodes}: set {RDZV_ENDPOINT}=HOST:PORT (the same on every node, "
                              f"HOST one of the nodes), got {endpoint!r}")
        store_timeout()


def store_timeout() -> float:
    value = os.environ.get(RDZV_TIMEOUT, "60")
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds <= 3600:
        raise LaunchError(f"{RDZV_TIMEOUT}={value!r}: give the seconds to wait for the rendezvous store, 1 to 3600")
    return seconds


def launch(cfg: Train, device: torch.device, module: str, log=print) -> None:
    """Run `python -m module` in cfg.processes workers on this node (and join cfg.nodes - 1 other nodes);
    return when all have finished, raise LaunchError naming the rank of the first that failed."""
    from torch.distributed.launcher.api import LaunchConfig

    check(cfg, device)
    world = cfg.processes * cfg.nodes
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # the failure is reported below
    with tempfile.TemporaryDirectory(prefix="offroad-rdzv-") as meeting, rendezvous(cfg, meeting) as (endpoint, extra):
        config = LaunchConfig(min_nodes=cfg.nodes, max_nodes=cfg.nodes, nproc_per_node=cfg.processes,
                              run_id=os.environ.get(RDZV_ID, "offroad-train") if cfg.nodes > 1 else uuid.uuid4().hex,
                              rdzv_backend="c10d", rdzv_endpoint=endpoint, rdzv_configs=extra, max_restarts=0)
        where = f"c10d at {endpoint}" if cfg.nodes > 1 else "in a private folder, loopback only"
        log(f"train: launching {cfg.processes} process(es) on this node, {cfg.nodes} node(s), world {world}, "
            f"{'nccl' if device.type == 'cuda' else 'gloo'}, rendezvous {where}")
        if cfg.nodes > 1:
            check_store(endpoint, store_timeout())
        run_workers(config, module, endpoint, cfg.nodes, world)


@contextlib.contextmanager
def rendezvous(cfg: Train, folder: str) -> Iterator[tuple[str, dict]]:
    """The rendezvous endpoint and its configs, with what the workers inherit through the environment while
    they run: the launcher's pid and, on one node, files in `folder` and loopback networking."""
    settings = {LAUNCHER_PID: str(os.getpid())}
    if cfg.nodes == 1:
        settings |= {INIT_FILE: os.path.join(folder, "group"), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
                     "GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"}  # even if set for other jobs
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    try:
        if cfg.nodes > 1:
            yield os.environ[RDZV_ENDPOINT], {}
        else:
            yield os.path.join(folder, "rendezvous"), {"store_type": "file"}
    finally:
        for k, v in saved.items():
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v


def check_store(endpoint: str, seconds: float) -> None:
    """Unless this node hosts it, the rendezvous store at `endpoint` answers within `seconds`, or one LaunchError
    line. Asked from a child process: torch's client waits forever on a port whose listener never answers, and
    logs C++ frames while it retries."""
    host, _, port = endpoint.rpartition(":")
    if hosts_here(host, int(port)):
        return
    ask = [sys.executable, "-c", "import sys; from offroad import launch; launch.connect_store(*sys.argv[1:])",
           host, port, str(seconds), str(os.getpid())]
    try:
        done = subprocess.run(ask, capture_output=True, text=True, timeout=2 * seconds + 15)  # a retry, the import
    except subprocess.TimeoutExpired:
        raise LaunchError(f"rendezvous at {endpoint}: something accepts connections there but has not answered as "
                          f"torch's store in {seconds:g} s; is another program using port {port}? Choose a free "
                          f"port for {RDZV_ENDPOINT} (the same on every node)") from None
    if done.returncode != 0:
        errors = [m.group(1).rstrip(".") for m in re.finditer(r"^[\w.]+(?:Error|Exception): (.+)$", done.stderr, re.M)]
        raise LaunchError(f"rendezvous at {endpoint}: no store answered in {seconds:g} s "
                          f"({errors[-1] if errors else 'exit status ' + str(done.returncode)}); start the node "
                          f"{host} names, check that this node reaches it, or wait longer with {RDZV_TIMEOUT}")


def connect_store(host: str, port: str, seconds: str, parent: str) -> None:
    die_with_parent(int(parent))
    torch.distributed.TCPStore(host, int(port), is_master=False, multi_tenant=True,
                               timeout=timedelta(seconds=float(seconds)))


def hosts_here(host: str, port: int) -> bool:
    """Whether this node will host the store: `host` is one of its addresses and nothing holds the port."""
    try:
        with socket.create_server((host, port)):
            return True
    except OSError as e:
        if e.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL) and not isinstance(e, socket.gaierror):
            raise LaunchError(f"rendezvous at {host}:{port}: {e.strerror or e}") from None
        return False


def run_workers(config, module: str, endpoint: str, nodes: int, world: int) -> None:
    """The elastic launch of `config` running `python -m module`; its failures as one LaunchError line."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.launcher.api import elastic_launch

    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", module)
    except ChildFailedError as e:
        raise LaunchError(describe_failures(e.failures, world)) from None
    except SignalException as e:  # Ctrl-C or a kill of the launcher: the workers were stopped
        raise LaunchError(f"train: stopped by {e.sigval.name}, all {world} workers too; models/last.pt keeps the "
                          "last completed epoch and `dvc repro` resumes from it") from None
    except RendezvousError as e:
        raise LaunchError(f"rendezvous at {endpoint} failed: not all {nodes} nodes joined "
                          f"({type(e).__name__}: {e})") from None


def describe_failures(failures: dict, world: int) -> str:
    """One line: the failed ranks, the cause first: killed by a signal, else exited with an error; last those
    the launcher itself stopped with SIGTERM."""
    def what(rank: int) -> str:
        f = failures[rank]
        how = f"was killed by {f.signal_name()}" if f.exitcode < 0 else f"exited with status {f.exitcode}"
        return f"rank {rank} (pid {f.pid}) {how}"

    def order(rank: int) -> tuple:
        f = failures[rank]
        return f.exitcode == -signal.SIGTERM, f.exitcode >= 0, f.timestamp, rank

    ranks = sorted(failures, key=order)
    return (f"train: worker {what(ranks[0])}" + "".join(f"; {what(r)}" for r in ranks[1:]) +
            f"; all {world} workers were stopped, models/last.pt keeps the last completed epoch "
            "and `dvc repro` resumes from it")


def die_with_launcher() -> None:
    """Workers run in sessions of their own: have the kernel kill this one if its launcher dies (Linux); the
    launcher's SIGINT (Ctrl-C), passed on to them, ends them without a traceback each."""
    launcher = os.environ.get(LAUNCHER_PID)
    if launcher is None:
        return
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    die_with_parent(int(launcher))
