"""Who a worker is in its tensor-parallel group and its pipeline, and how they talk.

A worker process joins one `torch.distributed` process group (NCCL on CUDA, gloo on CPU) of
`tensor_parallel_size x pipeline_parallel_size` ranks at start-up. Global rank r is tensor-parallel
rank `r % tp` of pipeline stage `r // tp` (vLLM's layout): each stage's ranks form a sub-group for
the layers' all-reduces, and rank r talks to the same tensor-parallel rank of the next stage
(r + tp) with point-to-point sends. Who a worker is then travels as two small objects that the layers
hold, `TensorParallelGroup` and `PipelineParallelGroup`, rather than as globals. With a group of
one, every collective is the identity and costs nothing.
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


@dataclass(frozen=True)
class PipelineParallelGroup:
    """This worker's stage of the pipeline: which layers it holds, and the ranks its hidden states
    come from (`prev_rank`, the same tensor-parallel rank of the stage before) and go to (`next_rank`).

    `layer_partition` (layers per stage, summing to the model's) overrides the even split, as vLLM's
    `VLLM_PP_LAYER_PARTITION` does (here `PAGEDLLM_PP_LAYER_PARTITION`, read by `ParallelConfig`)."""

    rank: int = 0
    world_size: int = 1
    prev_rank: Optional[int] = None  # global ranks; None on the first / last stage
    next_rank: Optional[int] = None
    layer_partition: Optional[tuple[int, ...]] = None

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.world_size - 1

    def layer_range(self, num_layers: int) -> tuple[int, int]:
        """[start, end) of the layers this stage holds."""
        return get_pp_indices(num_layers, self.rank, self.world_size, self.layer_partition)

    def send(self, tensors: list[torch.Tensor]) -> None:
        """Hand this stage's outputs to the next stage (blocking until the peer takes them on gloo)."""
        for tensor in tensors:
            dist.send(tensor.contiguous(), self.next_rank)

    def recv(self, shapes: list[tuple[int, ...]], dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
        """The previous stage's outputs, in the order it sent them."""
        tensors = [torch.empty(shape, dtype=dtype, device=device) for shape in shapes]
        for tensor in tensors:
            dist.recv(tensor, self.prev_rank)
        return tensors


def get_pp_indices(num_layers: int, pp_rank: int, pp_size: int,
                   partition: Optional[tuple[int, ...]] = None) -> tuple[int, int]:
    """[start, end) of stage `pp_rank`'s layers. Even split; the layers left over go one each to the
    stages before the last (the last stage also runs the final norm and the LM head), as vLLM's
    `get_pp_indices` does. `partition` gives every stage's count instead."""
    if partition is None:
        counts = [num_layers // pp_size] * pp_size
        for i in range(num_layers % pp_size):
            counts[-2 - i] += 1
    else:
        counts = list(partition)
    start = sum(counts[:pp_rank])
    return start, start + counts[pp_rank]


def init_distributed_environment(rank: int, world_size: int, distributed_init_method: str,
                                 device: torch.device,
                                 timeout: timedelta = DEFAULT_COLLECTIVE_TIMEOUT,
                                 tensor_parallel_size: Optional[int] = None,
                                 layer_partition: Optional[tuple[int, ...]] = None,
                                 ) -> tuple[TensorParallelGroup, PipelineParallelGroup]:
    """Join the group (this process's default one): NCCL for CUDA devices, gloo for CPU. With
    `tensor_parallel_size` < `world_size` the ranks form `world_size / tp` pipeline stages."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "gloo" and distributed_init_method.startswith("tcp://127.0.0.1:"):
        # A container's hostname may resolve to an address the loopback peers cannot reach.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(backend, init_method=distributed_init_method, rank=rank, world_size=world_size,
                            timeout=timeout)
    tp = tensor_parallel_size or world_size
    pp = world_size // tp
    stage = rank // tp
    if pp == 1:
        tp_group = TensorParallelGroup(rank=rank, world_size=world_size, group=dist.group.WORLD)
    else:
        # Every rank creates every stage's sub-group, in the same order (torch.distributed's rule).
        subgroups = [dist.new_group(list(range(s * tp, (s + 1) * tp))) for s in range(pp)]
        tp_group = TensorParallelGroup(rank=rank % tp, world_size=tp, group=subgroups[stage])
    pp_group = PipelineParallelGroup(rank=stage, world_size=pp,
                                     prev_rank=rank - tp if stage > 0 else None,
                                     next_rank=rank + tp if stage < pp - 1 else None,
                                     layer_partition=layer_partition)
    # One collective now, so that a broken network setup fails at start-up and not mid-request.
    probe = torch.zeros(1, device=device)
    dist.all_reduce(probe)
    return tp_group, pp_group


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
