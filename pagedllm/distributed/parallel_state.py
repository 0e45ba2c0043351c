"""Who a worker is in its tensor-parallel group, and how the group talks.

A worker process joins one `torch.distributed` process group (NCCL on CUDA, gloo on CPU) at
start-up; its rank and the group's size then travel as a small `TensorParallelGroup` object that
the parallel layers hold, rather than as globals. With a group of one, every collective is the
identity and costs nothing.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist

# A collective that waits longer than this means a peer is gone; the executor notices a dead
# worker much sooner through its process sentinel, this is the last resort.
DEFAULT_COLLECTIVE_TIMEOUT = timedelta(minutes=10)


@dataclass(frozen=True)
class TensorParallelGroup:
    rank: int = 0
    world_size: int = 1
    group: Optional[Any] = None  # a torch.distributed ProcessGroup; None: the default group

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the group, in place; every rank gets the same bytes."""
        if self.world_size == 1:
            return x
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's `x` along `dim`, in rank order."""
        if self.world_size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=dim)


def init_distributed_environment(rank: int, world_size: int, distributed_init_method: str,
                                 device: torch.device,
                                 timeout: timedelta = DEFAULT_COLLECTIVE_TIMEOUT) -> TensorParallelGroup:
    """Join the group (this process's default one): NCCL for CUDA devices, gloo for CPU."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "gloo" and distributed_init_method.startswith("tcp://127.0.0.1:"):
        # A container's hostname may resolve to an address the loopback peers cannot reach.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(backend, init_method=distributed_init_method, rank=rank, world_size=world_size,
                            timeout=timeout)
    group = TensorParallelGroup(rank=rank, world_size=world_size, group=dist.group.WORLD)
    # One collective now, so that a broken network setup fails at start-up and not mid-request.
    group.all_reduce(torch.zeros(1, device=device))
    return group


def destroy_distributed_environment() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def get_ip() -> str:
    """This machine's address as other machines of a cluster see it (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.254.254.254", 1))
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def get_open_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on now, from the OS; several engines on one host each get their own."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def get_distributed_init_method(ip: str, port: int) -> str:
    return f"tcp://{ip}:{port}"
