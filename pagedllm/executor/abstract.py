"""`Executor`: the engine core's one handle on the model, however many processes run it.

The engine core hands each step's `SchedulerOutput` to `execute_model` and gets the sampled tokens
back; at start-up it asks how much KV cache every worker can hold (`determine_available_memory`,
the smallest answer wins) and then has them all allocate the same number of blocks
(`initialize_kv_cache`). Each of these is one call on every worker (`collective_rpc`). Which
executor runs is fixed at start-up from `ParallelConfig` (`executor_class` in `executor/__init__.py`):
`UniProcExecutor` (one `Worker` in this process, the default), `MultiprocExecutor` (tensor-parallel
worker processes on this machine) or `RayDistributedExecutor` (workers as Ray actors, anywhere in a
cluster). The scheduler and the
block manager stay with the engine core whatever the executor.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from pagedllm.config import EngineConfig
from pagedllm.scheduler_output import ModelRunnerOutput, SchedulerOutput


class ExecutorDeadError(RuntimeError):
    """A worker died or failed: the executor cannot run another step."""


class Executor(ABC):
    def __init__(self, config: EngineConfig) -> None:
        self.config = config

    @abstractmethod
    def collective_rpc(self, method: str, *args: Any) -> list[Any]:
        """Call `Worker.<method>(*args)` on every rank; their results in rank order. Raises
        `ExecutorDeadError` if a worker is gone or fails."""

    def determine_available_memory(self) -> int:
        """Bytes of KV cache every worker can hold (the smallest rank's answer)."""
        return min(self.collective_rpc("determine_available_memory"))

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.collective_rpc("initialize_kv_cache", num_blocks)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step on every worker; rank 0's output (the others are the same)."""
        return self.collective_rpc("execute_model", scheduler_output)[0]

    def check_health(self) -> None:
        """Raise `ExecutorDeadError` if a worker is known to be dead."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stop the workers and free the model and the KV cache; safe to call twice."""
