"""Executors: who runs the model runners — this process, worker processes, or Ray actors."""

from pagedllm.config import EngineConfig
from pagedllm.executor.abstract import Executor, ExecutorDeadError


def executor_class(config: EngineConfig) -> type[Executor]:
    """The executor `ParallelConfig` asks for, imported only when picked (Ray stays optional)."""
    backend = config.parallel_config.executor_backend
    if backend == "uni":
        from pagedllm.executor.uniproc_executor import UniProcExecutor

        return UniProcExecutor
    if backend == "mp":
        from pagedllm.executor.multiproc_executor import MultiprocExecutor

        return MultiprocExecutor
    from pagedllm.executor.ray_distributed_executor import RayDistributedExecutor

    return RayDistributedExecutor


__all__ = ["Executor", "ExecutorDeadError", "executor_class"]
