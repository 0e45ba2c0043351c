"""Executors: who runs the model runners — this process, worker processes, or Ray actors."""

from pagedllm.executor.abstract import Executor, ExecutorDeadError

__all__ = ["Executor", "ExecutorDeadError"]
