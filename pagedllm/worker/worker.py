"""`Worker`: one tensor-parallel rank in a process of its own — its device, its place in the
process group, and its `ModelRunner` (its share of the model and of the KV cache).

The executors start workers (as processes or Ray actors) and call `execute_model` on every rank
with the same `SchedulerOutput`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from pagedllm.config import EngineConfig
from pagedllm.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from pagedllm.distributed.parallel_state import (
    TensorParallelGroup,
    destroy_distributed_environment,
    init_distributed_environment,
)
from pagedllm.worker.model_runner import ModelRunner


class Worker:
    def __init__(self, config: EngineConfig, rank: int, world_size: int, distributed_init_method: str,
                 local_rank: Optional[int] = None, num_threads: Optional[int] = None) -> None:
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        device = config.device
        if device.type == "cuda":
            device = torch.device("cuda", rank if local_rank is None else local_rank)
            torch.cuda.set_device(device)
            config = dataclasses.replace(config, device=device)
        self.rank = rank
        if world_size > 1:
            self.tp_group = init_distributed_environment(rank, world_size, distributed_init_method, device)
        else:
            self.tp_group = TensorParallelGroup()
        self.model_runner = ModelRunner(config, self.tp_group)

    @property
    def num_blocks(self) -> int:
        return self.model_runner.num_blocks

    def execute_model(self, scheduler_output: SchedulerOutput) -> Optional[ModelRunnerOutput]:
        """Every rank runs the step; only rank 0 answers (the others' outputs are the same)."""
        output = self.model_runner.execute_model(scheduler_output)
        return output if self.rank == 0 else None

    def shutdown(self) -> None:
        self.model_runner = None
        destroy_distributed_environment()
