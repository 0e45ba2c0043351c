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
from collections import deque
from typing import Any

from pagedllm.config import EngineConfig
from pagedllm.scheduler_output import ModelRunnerOutput, SchedulerOutput


class ExecutorDeadError(RuntimeError):
    """A worker died or failed: the executor cannot run another step."""


class Executor(ABC):
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._pending: deque[Any] = deque()  # steps submitted and not yet waited for, oldest first

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
        """Run one step on every worker; the output rank's output (tensor-parallel rank 0 of the last
        pipeline stage; the other ranks answer None)."""
        return self.collective_rpc("execute_model", scheduler_output)[self.config.parallel_config.output_rank]

    def submit_step(self, scheduler_output: SchedulerOutput) -> None:
        """Start a step without waiting for it (pipeline parallelism keeps one batch per stage in
        flight). Steps complete in the order they were submitted; `wait_step` returns the oldest.
        By default the step runs now; executors with worker processes only send it."""
        self._pending.append(self.execute_model(scheduler_output))

    def wait_step(self) -> ModelRunnerOutput:
        """The output of the oldest submitted step, once it is done."""
        return self._pending.popleft()

    def check_health(self) -> None:
        """Raise `ExecutorDeadError` if a worker is known to be dead."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stop the workers and free the model and the KV cache; safe to call twice."""
