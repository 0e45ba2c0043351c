"""`UniProcExecutor`: one `Worker` in the engine core's own process, called directly (the default)."""

from __future__ import annotations

from typing import Any, Optional

from pagedllm.config import EngineConfig
from pagedllm.executor.abstract import Executor
from pagedllm.worker.model_runner import ModelRunner
from pagedllm.worker.worker import Worker


class UniProcExecutor(Executor):
    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self.worker: Optional[Worker] = Worker(config)

    def collective_rpc(self, method: str, *args: Any) -> list[Any]:
        return [getattr(self.worker, method)(*args)]

    @property
    def model_runner(self) -> Optional[ModelRunner]:
        """The runner itself, for tests and benchmarks that look inside a step."""
        return None if self.worker is None else self.worker.model_runner

    def shutdown(self) -> None:
        worker, self.worker = self.worker, None
        if worker is not None:
            worker.shutdown()
