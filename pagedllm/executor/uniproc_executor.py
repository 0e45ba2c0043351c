"""`UniProcExecutor`: the model runner in the engine's own process, called directly (the default)."""

from __future__ import annotations

from typing import Optional

from pagedllm.config import EngineConfig
from pagedllm.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from pagedllm.executor.abstract import Executor
from pagedllm.worker.model_runner import ModelRunner


class UniProcExecutor(Executor):
    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self.model_runner: Optional[ModelRunner] = ModelRunner(config)
        self.num_blocks = self.model_runner.num_blocks

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.model_runner.execute_model(scheduler_output)

    def shutdown(self) -> None:
        """Drop the model, the KV cache and the CUDA graphs so their memory returns at once."""
        runner, self.model_runner = self.model_runner, None
        if runner is not None:
            runner.cuda_graphs = None  # the graphs hold the model, the cache and their memory pool
            runner.kv_caches = []
            runner.model = None
