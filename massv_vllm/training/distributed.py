"""The process group of a training run: the launcher's (``deepspeed``, ``torchrun``), or a
one-process group when a script is run with plain ``python``; collective helpers that are no-ops
on one process, and progress messages printed by rank 0 only."""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass

import torch


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed(local_rank: int | None = None) -> Dist:
    """Join the launcher's process group, or make a one-process group when run with plain python."""
    import deepspeed
    import torch.distributed as td

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK=str(local_rank or 0))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local = int(os.environ.get("LOCAL_RANK", local_rank or 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not td.is_initialized():
        deepspeed.init_distributed(verbose=False)
    return Dist(td.get_rank(), td.get_world_size(), local, device)


def barrier(dist: Dist) -> None:
    if dist.world > 1:
        import torch.distributed as td

        td.barrier()


def all_sum(values: list[float], dist: Dist) -> list[float]:
    if dist.world == 1:
        return values
    import torch.distributed as td

    t = torch.tensor(values, dtype=torch.float64, device=dist.device)
    td.all_reduce(t)
    return t.tolist()


def say(dist: Dist, msg: str) -> None:
    if dist.main:
        print(f"[massv] {msg}", file=sys.stderr, flush=True)
