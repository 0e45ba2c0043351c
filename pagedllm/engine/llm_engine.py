"""`LLMEngine`: one engine step = schedule, run the model, update requests, build outputs.

The engine owns the tokenizer (prompts in, text out), the scheduler (what runs) and the
executor (how it runs: the model runner here, or tensor-parallel workers elsewhere). `LLM` drives it to completion offline; the server will drive
it step by step.
"""

from __future__ import annotations

import gc
import time
from typing import Any, Optional, Union

from pagedllm.config import EngineConfig
from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.core.scheduler import Scheduler
from pagedllm.engine.arg_utils import EngineArgs
from pagedllm.engine.engine_state import EngineState, StateHistory, build_engine_state
from pagedllm.engine.metrics import EngineCounters, Metric, StatLogger, collect_metrics
from pagedllm.engine.output_processor import OutputProcessor
from pagedllm.engine.parent_request import child_request_id, child_sampling_params
from pagedllm.engine.request import Request, RequestStatus
from pagedllm.engine.tokenizer import eos_token_ids, load_generation_config, load_tokenizer, sampling_defaults
from pagedllm.executor.abstract import Executor
from pagedllm.logger import init_logger
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import SamplingParams
from pagedllm.worker.model_runner import ModelRunner

logger = init_logger(__name__)

PromptType = Union[str, list[int], dict]


class LLMEngine:
    def __init__(self, config: EngineConfig, tokenizer: Any, generation_config: Optional[dict] = None,
                 log_stats: bool = True) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.generation_config = generation_config or {}
        mc, cc = config.model_config, config.cache_config
        self.eos_token_ids = eos_token_ids(tokenizer, mc.hf_config, self.generation_config)
        self.default_sampling_overrides = sampling_defaults(self.generation_config)
        if self.default_sampling_overrides:
            logger.info("Default sampling parameters from the model's generation config: %s",
                        self.default_sampling_overrides)
        start = time.perf_counter()
        self.model_executor: Optional[Executor] = Executor.get_class(config)(config)
        num_blocks = self.model_executor.num_blocks
        capacity = num_blocks * cc.block_size
        if mc.max_model_len > capacity:
            raise ValueError(
                f"max_model_len ({mc.max_model_len}) is larger than the KV cache can hold "
                f"({num_blocks} blocks x {cc.block_size} = {capacity} tokens); lower max_model_len or "
                "give the cache more room (num_gpu_blocks_override, kv_cache_memory_bytes, "
                "PAGEDLLM_CPU_KVCACHE_SPACE)"
            )
        tp = config.parallel_config.tensor_parallel_size
        logger.info(
            "KV cache: %d blocks x %d tokens = %d tokens of %s K/V on %s%s; maximum concurrency for %d-token "
            "requests: %.2fx",
            num_blocks, cc.block_size, capacity, str(config.kv_cache_dtype).removeprefix("torch."),
            config.device, f" (x{tp} workers, each 1/{tp} of the heads)" if tp > 1 else "",
            mc.max_model_len, capacity / mc.max_model_len,
        )
        self.kv_cache_manager = KVCacheManager(num_blocks, cc.block_size, cc.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler_config, self.kv_cache_manager)
        self.output_processor = OutputProcessor(tokenizer)
        self.counters = EngineCounters()
        self.state_history = StateHistory()
        self.stat_logger = StatLogger() if log_stats else None
        logger.info("Engine ready in %.2f s", time.perf_counter() - start)

    @classmethod
    def from_engine_args(cls, args: EngineArgs, model_path: str) -> "LLMEngine":
        hf_config = args.load_hf_config(model_path)
        config = args.create_engine_config(model_path, hf_config)
        tokenizer = load_tokenizer(config.model_config.tokenizer)
        return cls(config, tokenizer, load_generation_config(model_path))

    # ----- requests -----------------------------------------------------------------
    def process_prompt(self, prompt: PromptType) -> tuple[Optional[str], list[int]]:
        """Normalise any accepted prompt form to (text or None, token ids), checking it."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                text, ids = prompt.get("prompt"), list(prompt["prompt_token_ids"])
            elif "prompt" in prompt:
                text, ids = prompt["prompt"], None
            else:
                raise ValueError(f"a prompt dict needs 'prompt' or 'prompt_token_ids', got keys {sorted(prompt)}")
        elif isinstance(prompt, str):
            text, ids = prompt, None
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            text, ids = None, list(prompt)
        else:
            raise ValueError(f"unsupported prompt type {type(prompt).__name__}")
        if ids is None:
            if not isinstance(text, str):
                raise ValueError(f"prompt must be a string, got {type(text).__name__}")
            ids = self.tokenizer.encode(text)  # with the tokenizer's default special tokens (BOS)
        if not ids:
            raise ValueError("the prompt is empty (no tokens)")
        vocab = self.config.model_config.vocab_size
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids out of vocabulary (size {vocab}): {bad[:5]}")
        max_len = self.config.model_config.max_model_len
        if len(ids) >= max_len:
            raise ValueError(
                f"the prompt ({len(ids)} tokens) is too long for the maximum model length of {max_len} "
                "tokens (it must leave room for at least one generated token)"
            )
        return text, ids

    def add_request(self, request_id: str, prompt: PromptType, params: Optional[SamplingParams] = None,
                    arrival_time: Optional[float] = None) -> None:
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        if self.output_processor.has_request(request_id):
            raise ValueError(f"request id {request_id!r} is already in use")
        text, ids = self.process_prompt(prompt)
        params.verify_vocab(self.config.model_config.vocab_size)
        params = params.clone()
        if params.max_tokens is not None and params.min_tokens > params.max_tokens:
            raise ValueError("min_tokens must not exceed max_tokens")
        params.all_stop_token_ids |= self.eos_token_ids  # masked under min_tokens even with ignore_eos
        max_model_len = self.config.model_config.max_model_len
        max_tokens = max_model_len - len(ids)
        if params.max_tokens is not None:
            max_tokens = min(max_tokens, params.max_tokens)
        child_ids = [child_request_id(request_id, i, params.n) for i in range(params.n)]
        self.output_processor.add_request(request_id, text, ids, params, child_ids)
        block_size = self.config.cache_config.block_size
        for i, child_id in enumerate(child_ids):
            child_params = child_sampling_params(params, i)
            self.scheduler.add_request(Request(child_id, ids, child_params, max_tokens, block_size, arrival_time))

    def abort_request(self, request_id: Union[str, list[str]]) -> None:
        for rid in [request_id] if isinstance(request_id, str) else request_id:
            if not self.output_processor.has_request(rid):
                continue
            self.scheduler.finish_requests(self.output_processor.child_ids(rid), RequestStatus.FINISHED_ABORTED)
            self.output_processor.remove(rid)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def get_num_unfinished_requests(self) -> int:
        return len(self.output_processor.parents)

    # ----- the step -----------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduling step; return the outputs of requests that advanced."""
        sched_out = self.scheduler.schedule()
        runner_out = self.model_executor.execute_model(sched_out)
        self.counters.num_steps += 1
        updated = self.scheduler.update_from_output(sched_out, runner_out)
        touched: dict[str, None] = {}
        for child_id, (first_pos, lp) in runner_out.prompt_logprobs.items():
            if child_id in self.output_processor.child_to_parent:
                self.output_processor.add_prompt_logprobs(child_id, first_pos, lp)
        stopped_by_string = []
        for request in updated:
            if request.num_output_tokens == 1:
                self.counters.prompt_tokens += request.num_prompt_tokens
            self.counters.generation_tokens += 1
            new_tokens = request.output_token_ids[-1:]
            if self.output_processor.process(request, new_tokens, runner_out.logprobs.get(request.request_id)):
                stopped_by_string.append(request.request_id)
            touched[self.output_processor.parent_of(request.request_id)] = None
        if stopped_by_string:
            self.scheduler.finish_requests(stopped_by_string, RequestStatus.FINISHED_STOPPED)
        outputs = []
        for parent_id in touched:
            finished = self.output_processor.parents[parent_id].finished
            output = self.output_processor.make_output(parent_id)
            if output is not None:
                outputs.append(output)
            if finished:
                self.output_processor.remove(parent_id)
                self.counters.requests_finished += 1
        if self.stat_logger is not None:
            self.stat_logger.maybe_log(self.scheduler.stats(), self.counters)
        self.state_history.maybe_record(self)
        return outputs

    # ----- introspection ------------------------------------------------------------
    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def get_metrics(self) -> list[Metric]:
        return collect_metrics(self.scheduler.stats(), self.counters)

    def get_engine_state(self) -> EngineState:
        """A snapshot of the KV blocks, the queues and the counters (see `engine/engine_state.py`)."""
        return build_engine_state(self, self.state_history)

    def reset_prefix_cache(self) -> bool:
        return self.kv_cache_manager.reset_prefix_cache()

    @property
    def model_runner(self) -> Optional[ModelRunner]:
        """The in-process model runner (None when the model runs in worker processes)."""
        return getattr(self.model_executor, "model_runner", None)

    def shutdown(self) -> None:
        """Stop the workers, drop the model, the KV cache and the CUDA graphs so their memory returns at once."""
        executor = getattr(self, "model_executor", None)
        if executor is not None:
            executor.shutdown()
            self.model_executor = None
        gc.collect()
