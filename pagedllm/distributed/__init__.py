"""Process groups and the collectives tensor parallelism needs (torch.distributed: NCCL, gloo)."""

from pagedllm.distributed.parallel_state import (
    TensorParallelGroup,
    get_distributed_init_method,
    get_ip,
    get_open_port,
    init_distributed_environment,
)

__all__ = [
    "TensorParallelGroup",
    "get_distributed_init_method",
    "get_ip",
    "get_open_port",
    "init_distributed_environment",
]
