"""`Executor`: the engine's one handle on the model, however many processes run it.

The engine hands each step's `SchedulerOutput` to `execute_model` and gets the sampled tokens
back. Which executor runs is fixed at start-up from `ParallelConfig`: `UniProcExecutor` (the
model runner in this process, the default), `MultiprocExecutor` (tensor-parallel worker
processes on this machine) or `RayDistributedExecutor` (workers as Ray actors, anywhere in a
cluster). The scheduler and the block manager stay with the engine whatever the executor.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from pagedllm.config import EngineConfig
from pagedllm.core.scheduler_output import ModelRunnerOutput, SchedulerOutput


class ExecutorDeadError(RuntimeError):
    """A worker died or failed: the executor cannot run another step."""


class Executor(ABC):
    num_blocks: int  # KV-cache blocks every worker holds (the block manager's pool size)

    def __init__(self, config: EngineConfig) -> None:
        self.config = config

    @staticmethod
    def get_class(config: EngineConfig) -> type["Executor"]:
        backend = config.parallel_config.executor_backend
        if backend == "uni":
            from pagedllm.executor.uniproc_executor import UniProcExecutor

            return UniProcExecutor
        if backend == "mp":
            from pagedllm.executor.multiproc_executor import MultiprocExecutor

            return MultiprocExecutor
        from pagedllm.executor.ray_distributed_executor import RayDistributedExecutor

        return RayDistributedExecutor

    @abstractmethod
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step on every worker; raises `ExecutorDeadError` if one is gone."""

    def check_health(self) -> None:
        """Raise `ExecutorDeadError` if a worker is known to be dead."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stop the workers and free the model and the KV cache; safe to call twice."""
