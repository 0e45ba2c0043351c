"""`LLMEngine`: the offline frontend. One `step` = one engine-core step, its outputs turned into text.

It owns the tokenizer and both ends of a request's path through the frontend: the input processor
(prompts in, checked `EngineCoreRequest`s out) and the output processor (token ids in,
`RequestOutput`s out, stop strings matched). The engine core (scheduler, KV cache, executor) runs
in this process behind an `InprocClient`; `LLM` drives `step` until every request is done, and
`pagedllm generate` streams one request's DELTA outputs from it.
"""

from __future__ import annotations

import gc
from typing import Any, Optional, Union

from pagedllm.config import EngineConfig
from pagedllm.engine.arg_utils import EngineArgs
from pagedllm.engine.core_client import InprocClient
from pagedllm.engine.engine_core import StepFailedError
from pagedllm.engine.engine_state import EngineState
from pagedllm.engine.input_processor import InputProcessor, PromptType
from pagedllm.engine.metrics import Metric, StatLogger, collect_metrics
from pagedllm.engine.output_processor import OutputProcessor
from pagedllm.engine.tokenizer import load_generation_config, load_tokenizer
from pagedllm.lora.request import LoRARequest
from pagedllm.outputs import PoolingRequestOutput, RequestOutput
from pagedllm.pooling_params import PoolingParams
from pagedllm.request import RequestStatus
from pagedllm.sampling_params import SamplingParams


class LLMEngine:
    def __init__(self, config: EngineConfig, log_stats: bool = True) -> None:
        self.config = config
        mc = config.model_config
        self.tokenizer = load_tokenizer(mc.tokenizer)
        self.input_processor = InputProcessor(mc, self.tokenizer, load_generation_config(mc.generation_config),
                                              config.lora_config)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.engine_core = InprocClient(config)
        self.stat_logger = StatLogger() if log_stats else None

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs) -> "LLMEngine":
        return cls(engine_args.create_engine_config(), log_stats=not engine_args.disable_log_stats)

    # ----- requests -----------------------------------------------------------------
    def add_request(self, request_id: str, prompt: PromptType,
                    params: Optional[Union[SamplingParams, PoolingParams]] = None,
                    arrival_time: Optional[float] = None, lora_request: Optional[LoRARequest] = None) -> None:
        """A generation request (`SamplingParams`), or a pooling one (`PoolingParams`) on a pooling model."""
        if self.output_processor.has_request(request_id):
            raise ValueError(f"request id {request_id!r} is already in use")
        if isinstance(params, PoolingParams):
            request = self.input_processor.process_pooling(request_id, prompt, params, arrival_time)
        else:
            if self.config.model_config.runner_type == "pooling":
                raise ValueError("this is a pooling model (runner='pooling'): it cannot generate text; use "
                                 "embed, classify, score or encode")
            request = self.input_processor.process(request_id, prompt, params, arrival_time,
                                                   lora_request=lora_request)
        self.output_processor.add_request(request)
        try:
            self.engine_core.add_requests(request.core_requests)
        except BaseException:
            self.output_processor.abort_requests([request_id])
            raise

    def abort_request(self, request_id: Union[str, list[str]]) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        self.engine_core.abort_requests(self.output_processor.abort_requests(ids))

    def has_unfinished_requests(self) -> bool:
        return self.output_processor.has_unfinished_requests()

    def get_num_unfinished_requests(self) -> int:
        return self.output_processor.get_num_unfinished_requests()

    # ----- the step -----------------------------------------------------------------
    def step(self) -> list[Union[RequestOutput, PoolingRequestOutput]]:
        """Run one engine-core step; return the outputs of requests that advanced.

        A step that raises is raised (`StepFailedError`); when the core has found the request that
        breaks steps, that request is aborted first, so a caller that catches the error and steps on
        is left with the others (the core runs a failed step's requests alone until it finds one)."""
        try:
            core_outputs = self.engine_core.get_output()
        except StepFailedError as e:
            if e.culprit is not None:
                self.abort_request(self.output_processor.parent_of(e.culprit))
            raise
        processed = self.output_processor.process_outputs(core_outputs.outputs)
        if processed.reqs_to_abort:  # stop strings: the core ends them before its next step
            self.engine_core.abort_requests(processed.reqs_to_abort, RequestStatus.FINISHED_STOPPED)
        if self.stat_logger is not None:
            self.stat_logger.maybe_log(core_outputs.stats)
        return processed.request_outputs

    # ----- introspection ------------------------------------------------------------
    def get_tokenizer(self) -> Any:
        return self.tokenizer

    @property
    def default_sampling_overrides(self) -> dict:
        return self.input_processor.default_sampling_overrides

    def get_metrics(self) -> list[Metric]:
        return collect_metrics(self.engine_core.core.stats())

    def get_engine_state(self) -> EngineState:
        """A snapshot of the KV blocks, the queues and the counters (see `engine/engine_state.py`)."""
        return self.engine_core.get_engine_state().with_parent_ids(self.output_processor.parent_of)

    def reset_prefix_cache(self) -> bool:
        return self.engine_core.reset_prefix_cache()

    @property
    def model_runner(self) -> Any:
        """The in-process model runner, for tests and benchmarks that look inside a step (None when
        the model runs in worker processes)."""
        return getattr(self.engine_core.core.model_executor, "model_runner", None)

    def shutdown(self) -> None:
        """Stop the workers, drop the model, the KV cache and the CUDA graphs so their memory returns at once."""
        core = getattr(self, "engine_core", None)
        if core is not None:
            core.shutdown()
        gc.collect()
