"""`EngineCore`: the scheduler, the KV-cache manager and the executor, and nothing else.

It takes `EngineCoreRequest`s that a frontend has already tokenized and validated, and each `step`
returns what the sequences got: new token ids, logprobs as ids, finish reasons (`EngineCoreOutput`).
It never sees a tokenizer or text; stop strings, detokenization and `n > 1` are the frontend's
(`engine/output_processor.py`), which ends a sequence here through `abort_requests` when its text
matches a stop string. Frontends reach it through an `EngineCoreClient` (`engine/core_client.py`):
in this process for the offline `LLMEngine`, in a process of its own for the server.

Start-up sizes the KV cache in its own phase, as vLLM's does: build the executor (workers load the
model), ask it how many bytes each worker can give the cache, turn the smallest answer into a
block count (`core/kv_cache_utils.py`), have every worker allocate that many, then build the block
pool and the scheduler over the same count.

With pipeline parallelism (`pipeline_parallel_size` = P) a step is one batch moving through P stages;
the core keeps up to P batches in flight (vLLM's batch queue), each of requests the others do not
have, so that every stage has work: `_step_pipelined`.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Iterable

from pagedllm.config import EngineConfig
from pagedllm.core.kv_cache_utils import num_blocks_for_budget
from pagedllm.core.request_trace import make_tracer
from pagedllm.core.scheduler import Scheduler
from pagedllm.core.sliding_window_manager import make_kv_cache_manager
from pagedllm.engine.core_messages import EngineCoreOutput
from pagedllm.engine.engine_state import EngineState, PreemptionLog, StateHistory
from pagedllm.engine.metrics import EngineStats
from pagedllm.engine.tokenizer import load_tokenizer
from pagedllm.executor import Executor, ExecutorDeadError, executor_class
from pagedllm.logger import init_logger
from pagedllm.model_executor.kv_cache_groups import kv_cache_groups_for, max_blocks_per_request
from pagedllm.request import EngineCoreRequest, Request, RequestStatus
from pagedllm.sampling_params import SamplingParams
from pagedllm.scheduler_output import ModelRunnerOutput, ScheduledRequest, SchedulerOutput, TokenLogprobs
from pagedllm.structured_output.manager import StructuredOutputManager

logger = init_logger(__name__)

# Endings that count as a finished request (an abort does not).
_SUCCESS = (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH_CAPPED)


class StepFailedError(RuntimeError):
    """A step raised. `culprit`: the request found to break steps (it ran alone and failed), which the
    caller should fail; without one, the step's requests are suspects and run alone next.
    `engine_broken`: the failures are the engine's, not any request's (see `EngineCore.step`)."""

    def __init__(self, message: str, culprit: str | None, engine_broken: bool = False) -> None:
        super().__init__(message)
        self.culprit = culprit
        self.engine_broken = engine_broken


# Rounds of isolation in a row that find no culprit (every suspect passes alone, yet the batch keeps
# failing) before the engine is declared broken.
MAX_UNEXPLAINED_ROUNDS = 3


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        start = time.perf_counter()
        self.config = config
        self.model_executor: Executor | None = executor_class(config)(config)
        try:
            num_blocks = self._initialize_kv_cache()
        except BaseException:
            self.shutdown()
            raise
        cc = config.cache_config
        self.kv_cache_manager = make_kv_cache_manager(kv_cache_groups_for(config.model_config.text_config), num_blocks,
                                                      cc.block_size, cc.enable_prefix_caching)
        mc = config.model_config
        self.structured_output_manager = StructuredOutputManager(
            lambda: load_tokenizer(mc.tokenizer), mc.vocab_size, config.structured_outputs_backend)
        self.scheduler = Scheduler(config.scheduler_config, self.kv_cache_manager,
                                   make_tracer(config.scheduler_config.trace), self.structured_output_manager,
                                   max_loras=config.lora_config.max_loras if config.lora_config else None,
                                   num_lookahead_tokens=_num_lookahead_tokens(config))
        self.prompt_tokens = self.generation_tokens = self.requests_finished = self.num_steps = 0
        self.history = StateHistory()
        self.preemptions = PreemptionLog()
        # Requests of a step that raised, each to run alone until the one that breaks steps is found.
        self.suspects: dict[str, None] = {}
        self._round_found_culprit = False
        self._last_round_unexplained = False
        self._unexplained_rounds = 0
        # Pipeline parallelism: batches submitted to the stages and not yet returned, oldest first.
        self.max_batches_in_flight = config.parallel_config.pipeline_parallel_size
        self.batch_queue: deque[SchedulerOutput] = deque()
        logger.info("Engine core ready in %.2f s", time.perf_counter() - start)

    def _initialize_kv_cache(self) -> int:
        config, executor = self.config, self.model_executor
        mc, cc = config.model_config, config.cache_config
        if cc.num_gpu_blocks_override is not None:
            num_blocks = cc.num_gpu_blocks_override  # exact: nothing to measure
        else:
            num_blocks = num_blocks_for_budget(config, executor.determine_available_memory())
        capacity = num_blocks * cc.block_size
        # A model with local layers needs a block per group; its local groups only their window's.
        needed = max_blocks_per_request(kv_cache_groups_for(mc.text_config), mc.max_model_len, cc.block_size,
                                        config.scheduler_config.max_num_batched_tokens)
        if needed > num_blocks:
            raise ValueError(
                f"max_model_len ({mc.max_model_len}) is larger than the KV cache can hold "
                f"({num_blocks} blocks x {cc.block_size} = {capacity} tokens); lower max_model_len or "
                "give the cache more room (num_gpu_blocks_override, kv_cache_memory_bytes, "
                "PAGEDLLM_CPU_KVCACHE_SPACE)"
            )
        executor.initialize_kv_cache(num_blocks)
        tp, pp = config.parallel_config.tensor_parallel_size, config.parallel_config.pipeline_parallel_size
        logger.info(
            "KV cache: %d blocks x %d tokens = %d tokens of %s K/V on %s%s; maximum concurrency for %d-token "
            "requests: %.2fx",
            num_blocks, cc.block_size, capacity, str(config.kv_cache_dtype).removeprefix("torch."),
            config.device, (f" (x{tp} workers, each 1/{tp} of the heads)" if tp > 1 else "")
            + (f" (each of {pp} pipeline stages for its layers)" if pp > 1 else ""),
            mc.max_model_len, capacity / mc.max_model_len,
        )
        return num_blocks

    # ----- requests -----------------------------------------------------------------
    def add_request(self, request: EngineCoreRequest) -> None:
        self.scheduler.add_request(Request.from_engine_core_request(request, self.config.cache_config.block_size))

    def add_requests(self, requests: Iterable[EngineCoreRequest]) -> None:
        """The sequences of one user request (n of them for n > 1): all added, or, if one cannot be,
        none (those already in are taken out again) and the error raised."""
        added: list[str] = []
        try:
            for request in requests:
                self.add_request(request)
                added.append(request.request_id)
        except BaseException:
            self.abort_requests(added)
            raise

    def abort_requests(self, request_ids: Iterable[str],
                       status: RequestStatus = RequestStatus.FINISHED_ABORTED) -> None:
        """End sequences the frontend is done with (ids the core no longer has are ignored)."""
        request_ids = [rid for rid in request_ids if rid in self.scheduler.requests]
        if status in _SUCCESS:
            self.requests_finished += len(request_ids)
        self.scheduler.finish_requests(request_ids, status)

    def has_unfinished_requests(self) -> bool:
        """Requests to run, or a pipelined step still to collect (its requests may all be aborted)."""
        return self.scheduler.has_unfinished_requests() or bool(self.batch_queue)

    def unfinished_request_ids(self) -> list[str]:
        return list(self.scheduler.requests)

    def running_request_ids(self) -> list[str]:
        return [r.request_id for r in self.scheduler.running]

    # ----- the step -----------------------------------------------------------------
    def step(self) -> list[EngineCoreOutput]:
        """Schedule, run the model, update the sequences; what each sequence got this step.

        A step that raises is put back (`Scheduler.step_failed`) and its requests become suspects:
        the next steps run each of them alone, on the same chunk or decode that failed, so the one
        that breaks steps is found and its caller fails it (`StepFailedError.culprit`) while the
        others carry on. Whether a request that fails alone is at fault, or the engine is, a step of
        made-up input decides (`_probe_passes`): if that fails too, the engine is declared broken
        (`engine_broken`), however few or many requests ran before. So is an engine whose batches
        keep failing though each of their requests passes alone. A dead worker is not a request's
        fault and is raised as it is.
        """
        scheduler = self.scheduler
        while scheduler.grammar_failures:
            request_id, why = scheduler.grammar_failures.popitem()
            if request_id in scheduler.requests:
                raise StepFailedError(f"its structured-output constraint did not compile: {why}", request_id)
        if self.max_batches_in_flight > 1:
            return self._step_pipelined()
        suspect = self._next_suspect()
        sched_out = scheduler.schedule_alone(suspect) if suspect is not None else scheduler.schedule()
        if sched_out.is_empty and scheduler.waiting:
            # Nothing could run: wait a little for a grammar being compiled rather than spin.
            self.structured_output_manager.wait_for_compilation(scheduler.waiting, timeout=0.05)
        for request_id in sched_out.preempted_req_ids:
            self.preemptions.record(request_id, scheduler.requests[request_id].num_tokens)
        try:
            runner_out = self.model_executor.execute_model(sched_out)
        except ExecutorDeadError:
            raise
        except Exception as e:
            raise self._step_failed(e, sched_out, suspect) from e
        if suspect is None:
            self._unexplained_rounds = 0
            self._last_round_unexplained = False
        else:
            self.suspects.pop(suspect, None)
            if not self.suspects:  # the round is over
                self._last_round_unexplained = not self._round_found_culprit
        self.num_steps += 1
        return self._apply_step(sched_out, runner_out)

    def _step_pipelined(self) -> list[EngineCoreOutput]:
        """One call either puts a new batch into the pipeline (and returns nothing yet, while there is
        room for another) or waits for the oldest batch and returns what its sequences got.

        A batch holds only requests not already in flight (`Scheduler.in_flight`), so each stage
        works on a different batch at once. The workers run batches in the order sent, so KV blocks
        freed and reused while a batch is in flight are written in that order on every stage. A step
        that raises here is not isolated request by request: the workers are separate processes, and
        an error in one is fatal to the executor (`ExecutorDeadError`).
        """
        scheduler, queue = self.scheduler, self.batch_queue
        if len(queue) < self.max_batches_in_flight:
            # The requests not in flight, shared over the batches there is room for, so that the
            # stages get batches of similar size (micro-batches) rather than all and then nothing.
            ready = len(scheduler.running) + len(scheduler.waiting) - len(scheduler.in_flight)
            sched_out = scheduler.schedule(max_requests=max(1, -(-ready // (self.max_batches_in_flight - len(queue)))))
            if not sched_out.is_empty:
                for request_id in sched_out.preempted_req_ids:
                    self.preemptions.record(request_id, scheduler.requests[request_id].num_tokens)
                self.model_executor.submit_step(sched_out)
                queue.append(sched_out)
                scheduler.in_flight.update(s.request_id for s in sched_out.scheduled)
                if len(queue) < self.max_batches_in_flight:
                    return []
            else:
                scheduler.keep_finished_for_next_step(sched_out)
                if not queue:
                    if scheduler.waiting:  # waiting on a grammar being compiled: do not spin
                        self.structured_output_manager.wait_for_compilation(scheduler.waiting, timeout=0.05)
                    return []
        sched_out = queue.popleft()
        runner_out = self.model_executor.wait_step()
        scheduler.in_flight.difference_update(s.request_id for s in sched_out.scheduled)
        self.num_steps += 1
        return self._apply_step(sched_out, runner_out)

    def _apply_step(self, sched_out: SchedulerOutput, runner_out: ModelRunnerOutput) -> list[EngineCoreOutput]:
        """Update the sequences from a step's output; what each got (tokens, logprobs, finish), and the
        counters. With speculative decoding a step can emit several tokens per sequence: they are
        counted from the output tokens each had before."""
        scheduler = self.scheduler
        num_before = {s.request_id: scheduler.requests[s.request_id].num_output_tokens
                      for s in sched_out.scheduled if s.request_id in scheduler.requests}
        updated = scheduler.update_from_output(sched_out, runner_out)
        outputs: dict[str, EngineCoreOutput] = {}
        for request in updated:
            if request.pooling_params is not None:
                self.prompt_tokens += request.num_prompt_tokens
                self.requests_finished += 1
                outputs[request.request_id] = EngineCoreOutput(
                    request.request_id, [], finish_reason="stop", pooling_output=request.pooler_output)
                continue
            num_new = request.num_output_tokens - num_before[request.request_id]
            if num_before[request.request_id] == 0:
                self.prompt_tokens += request.num_prompt_tokens
            self.generation_tokens += num_new
            if request.status in _SUCCESS:
                self.requests_finished += 1
            logprobs = runner_out.logprobs.get(request.request_id)
            if logprobs is not None and len(logprobs.token_ids) > num_new:  # a stop inside an accepted run
                logprobs = TokenLogprobs(logprobs.token_ids[:num_new], logprobs.logprobs[:num_new],
                                         logprobs.ranks[:num_new])
            outputs[request.request_id] = EngineCoreOutput(
                request_id=request.request_id,
                new_token_ids=request.output_token_ids[-num_new:],
                new_logprobs=logprobs,
                finish_reason=request.status.finish_reason,
                stop_reason=request.stop_reason,
            )
        for request_id, prompt_logprobs in runner_out.prompt_logprobs.items():
            if request_id not in outputs and request_id not in self.scheduler.requests:
                continue  # aborted while its pipelined step was in flight
            output = outputs.setdefault(request_id, EngineCoreOutput(request_id, []))
            output.new_prompt_logprobs = prompt_logprobs
        self.history.maybe_record(self.stats)
        return list(outputs.values())

    def _step_failed(self, error: Exception, sched_out, suspect: str | None) -> StepFailedError:
        """Put the failed step back, update the isolation state, and say what the caller should do."""
        ids = [s.request_id for s in sched_out.scheduled]
        self.scheduler.step_failed(sched_out)
        message = f"{type(error).__name__}: {error}"
        if suspect is not None and ids == [suspect]:
            self.suspects.pop(suspect, None)
            self._round_found_culprit = True
            return StepFailedError(message, suspect, engine_broken=not self._probe_passes())
        if self._last_round_unexplained:
            self._unexplained_rounds += 1
        self._last_round_unexplained = False
        self._round_found_culprit = False
        self.suspects.update(dict.fromkeys(ids))
        return StepFailedError(message, None, engine_broken=self._unexplained_rounds >= MAX_UNEXPLAINED_ROUNDS)

    def _probe_passes(self) -> bool:
        """Run one step of made-up input: a one-token prompt, greedy, written into a free block.

        A request that fails alone may be bad input or may be the first to meet an engine that broke
        (a kernel that now always raises, a device in a bad state); counting failures cannot tell
        the two apart when bad requests come one after another. A step no request shaped can: if it
        fails too, the engine is broken. With no free block to write into, the request is blamed.
        """
        with self.kv_cache_manager.scratch_block() as block_id:
            if block_id is None:
                return True
            probe = ScheduledRequest(request_id="engine-core-probe", token_ids=[0], num_computed_tokens=0,
                                     block_ids=[block_id], sampling_params=SamplingParams(temperature=0.0),
                                     prompt_token_ids=[0], output_token_ids=[], sample=True)
            try:
                self.model_executor.execute_model(SchedulerOutput([probe], num_batched_tokens=1))
            except ExecutorDeadError:
                raise
            except Exception as e:
                logger.error("a step of made-up input fails too (%s: %s): the engine is broken",
                             type(e).__name__, e)
                return False
        return True

    def _next_suspect(self) -> str | None:
        """The first suspect still in the scheduler (finished or aborted ones are dropped)."""
        for request_id in list(self.suspects):
            if request_id in self.scheduler.requests:
                return request_id
            del self.suspects[request_id]
        return None

    # ----- introspection ------------------------------------------------------------
    def stats(self) -> EngineStats:
        scheduler, kv = self.scheduler, self.kv_cache_manager
        return EngineStats(
            time=time.time(),
            num_running=len(scheduler.running),
            num_waiting=len(scheduler.waiting),
            kv_cache_usage=kv.usage(),
            num_preemptions=scheduler.num_preemptions,
            prefix_cache_queries=kv.prefix_cache_queries,
            prefix_cache_hits=kv.prefix_cache_hits,
            prompt_tokens=self.prompt_tokens,
            generation_tokens=self.generation_tokens,
            requests_finished=self.requests_finished,
            num_steps=self.num_steps,
            running_lora_adapters=_count_adapters(scheduler.running),
            waiting_lora_adapters=_count_adapters(scheduler.waiting),
            max_lora=self.config.lora_config.max_loras if self.config.lora_config else 0,
            spec_decode_num_drafts=scheduler.spec_decoding_stats.num_drafts,
            spec_decode_num_draft_tokens=scheduler.spec_decoding_stats.num_draft_tokens,
            spec_decode_num_accepted_tokens=scheduler.spec_decoding_stats.num_accepted_tokens,
            spec_decode_num_accepted_tokens_per_pos=list(scheduler.spec_decoding_stats.num_accepted_tokens_per_pos),
        )

    def get_engine_state(self) -> EngineState:
        """What the KV cache and the scheduler hold now (see `engine/engine_state.py`); reads no tensor."""
        self.history.maybe_record(self.stats)
        queues = self.scheduler.snapshot()
        sc = self.config.scheduler_config
        return EngineState(
            time=time.time(),
            max_model_len=self.config.model_config.max_model_len,
            max_num_seqs=sc.max_num_seqs,
            max_num_batched_tokens=sc.max_num_batched_tokens,
            kv_cache=self.kv_cache_manager.snapshot(),
            running=queues.running,
            waiting=queues.waiting,
            counters=self.stats(),
            recent_preemptions=list(self.preemptions.events),
            history=list(self.history.samples),
        )

    def reset_prefix_cache(self) -> bool:
        return self.kv_cache_manager.reset_prefix_cache()

    def check_idle_invariant(self) -> None:
        """With no request left, every KV block must be free; raises if not."""
        if not self.has_unfinished_requests() and self.kv_cache_manager.usage() > 0:
            raise RuntimeError("KV-cache blocks are still in use with no request left")

    def shutdown(self) -> None:
        """Stop the workers, drop the model, the KV cache and the CUDA graphs so their memory returns at once."""
        executor, self.model_executor = self.model_executor, None
        if getattr(self, "structured_output_manager", None) is not None:
            self.structured_output_manager.shutdown()
        if executor is not None:
            executor.shutdown()


def _num_lookahead_tokens(config: EngineConfig) -> int:
    """Slots a request keeps past its tokens: a draft model's k proposals, or an EAGLE head's chained steps
    (n-gram drafts need none)."""
    spec = config.speculative_config
    return spec.num_speculative_tokens if spec is not None and spec.method in ("draft_model", "eagle") else 0


def _count_adapters(requests: Iterable[Request]) -> dict[str, int]:
    """Adapter name -> how many of `requests` run with it."""
    counts: dict[str, int] = {}
    for request in requests:
        if request.lora_request is not None:
            counts[request.lora_request.lora_name] = counts.get(request.lora_request.lora_name, 0) + 1
    return counts
