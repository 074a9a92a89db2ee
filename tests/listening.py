"""A DDP worker for tests/test_ddp.py: joins the process group as the train stage does, then writes to
$LISTENING_OUT the local addresses on which its launcher and the workers listen for TCP connections."""
import json
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist

from offroad.runtime import init_distributed


def socket_inodes(pid: int) -> set[str]:
    links = (os.readlink(f) for f in Path(f"/proc/{pid}/fd").iterdir() if f.is_symlink())
    return {link[8:-1] for link in links if link.startswith("socket:[")}


def listening(inodes: set[str]) -> list[str]:
    """host:port of the listening TCP sockets among `inodes`, from /proc/net/tcp and tcp6."""
    found = []
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # state LISTEN
                host, port = fields[1].split(":")
                raw = bytes.fromhex(host)
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # little-endian words
                found.append(f"{socket.inet_ntop(family, raw)}:{int(port, 16)}")
    return found


if __name__ == "__main__":
    run, _ = init_distributed(torch.device("cpu"))
    pids = [None] * run.world
    dist.all_gather_object(pids, os.getpid())
    dist.barrier()
    if run.rank == 0:
        inodes = set().union(*(socket_inodes(p) for p in [os.getppid(), *pids]))
        Path(os.environ["LISTENING_OUT"]).write_text(json.dumps(listening(inodes)))
    dist.barrier()
    dist.destroy_process_group()
