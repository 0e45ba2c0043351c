"""The scheduler: each step, decide which requests run and how many tokens each feeds.

One token budget (`max_num_batched_tokens`) is shared by running requests (decodes and
unfinished prefill chunks, served first, in admission order) and newly admitted waiting
requests (FCFS, their prompts chunked to fit). When the KV cache runs out of blocks, the
most recently admitted running request is preempted: its blocks are freed and it goes
back to the front of the waiting queue, to be recomputed later. The scheduler touches no
tensors; its decision leaves as one `SchedulerOutput`.

A pooling request (embed, classify, score) has no decode phase: it is admitted only when its whole
prompt fits the step's budget (never chunked: mean pooling and an encoder's bidirectional attention
need every position at once), and it finishes after that one step with its pooled vector
(`update_from_output`), freeing its blocks at once.

Under pipeline parallelism the engine core keeps several steps in flight (`in_flight`: the requests
of steps not yet returned). Such a request is neither scheduled again nor preempted until its step
is back: its next tokens depend on the one being sampled, and its blocks are still being written.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Iterable, Optional

from pagedllm.config import SchedulerConfig
from pagedllm.core.block_pool import KVCacheBlock
from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.core.request_trace import RequestTracer
from pagedllm.core.snapshot import RequestInfo, SchedulerState
from pagedllm.logger import init_logger
from pagedllm.request import Request, RequestStatus
from pagedllm.scheduler_output import ModelRunnerOutput, ScheduledRequest, SchedulerOutput
from pagedllm.spec_decode.metrics import SpecDecodingStats
from pagedllm.structured_output.manager import StructuredOutputManager

logger = init_logger(__name__)


class Scheduler:
    """`tracer` hears of every decision about a request (`core/request_trace.py`; the default
    ignores them). `structured_output_manager` compiles the constraints of requests that have one,
    and gives each step its grammar bitmask. `max_loras` (with LoRA on) caps the distinct adapters
    of the running requests, so that every step's adapters fit the workers' slots."""

    def __init__(self, config: SchedulerConfig, kv_cache_manager: KVCacheManager,
                 tracer: Optional[RequestTracer] = None,
                 structured_output_manager: Optional[StructuredOutputManager] = None,
                 max_loras: Optional[int] = None, num_lookahead_tokens: int = 0) -> None:
        self.config = config
        self.kv_cache_manager = kv_cache_manager
        self.block_size = kv_cache_manager.block_size
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self._finished_since_last_step: set[str] = set()
        self.tracer = tracer or RequestTracer()
        self.structured_output_manager = structured_output_manager
        self.grammar_failures: dict[str, str] = {}  # request id -> why its constraint did not compile
        self.max_loras = max_loras
        self.in_flight: set[str] = set()  # requests of steps still running (pipeline parallelism)
        self.spec_decoding_stats = SpecDecodingStats()  # drafts verified and accepted (speculative decoding)
        # A draft model writes its proposals' K/V past a request's tokens: that many slots are kept for it.
        self.num_lookahead_tokens = num_lookahead_tokens

    # ----- queue management -------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in the scheduler")
        if request.sampling_params.structured_outputs is not None:
            if self.structured_output_manager is None:
                raise ValueError("this scheduler has no structured-output manager for a constrained request")
            self.structured_output_manager.grammar_init(request)
        self.requests[request.request_id] = request
        self.waiting.append(request)
        self.tracer.added(request)

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> None:
        """End requests from outside a step (a stop string matched, or an abort)."""
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None or request.is_finished:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            request.status = status
            self._free(request)

    def _free(self, request: Request) -> None:
        released = self.kv_cache_manager.free(request)
        self.tracer.finished(request, released)
        self._finished_since_last_step.add(request.request_id)
        del self.requests[request.request_id]

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def get_num_unfinished_requests(self) -> int:
        return len(self.waiting) + len(self.running)

    # ----- the decision -----------------------------------------------------------
    def schedule(self, max_requests: Optional[int] = None) -> SchedulerOutput:
        """`max_requests`: at most this many requests in the step (pipeline parallelism splits the
        requests over the batches in flight); None: as many as the budget and `max_num_seqs` allow."""
        budget = self.config.max_num_batched_tokens
        room = max_requests if max_requests is not None else len(self.requests)
        scheduled: list[tuple[Request, int]] = []
        preempted: set[str] = set()

        # 1. Running requests first, oldest first; preempt the newest when blocks run out.
        i = 0
        while i < len(self.running) and budget > 0 and len(scheduled) < room:
            request = self.running[i]
            if request.request_id in self.in_flight:
                i += 1
                continue
            # A decoding request's drafts run after its last token, in the same budget (cut to fit).
            num_new = min(request.num_tokens + len(request.spec_token_ids) - request.num_computed_tokens, budget)
            if request.pooling_params is not None and num_new < request.num_tokens - request.num_computed_tokens:
                num_new = 0  # a pooling prompt is never chunked: it waits for a step with room
            if num_new <= 0:
                i += 1
                continue
            while (new_blocks := self.kv_cache_manager.allocate_slots(
                    request, num_new, num_lookahead_tokens=self.num_lookahead_tokens)) is None:
                victim = self._newest_preemptible()
                self.running.remove(victim)
                self._preempt(victim)
                preempted.add(victim.request_id)
                if victim is request:
                    break
            else:
                self.tracer.scheduled(request, num_new, new_blocks)
                scheduled.append((request, num_new))
                budget -= num_new
                i += 1

        # 2. Admit waiting requests, unless this step already had to preempt. A request whose grammar
        #    is still compiling, or whose LoRA adapter finds every slot taken by other running
        #    adapters, keeps its place and lets the ones behind it in.
        skipped: list[Request] = []
        running_loras = self.running_lora_ids()
        while (self.waiting and budget > 0 and not preempted and len(self.running) < self.config.max_num_seqs
               and len(scheduled) < room):
            request = self.waiting[0]
            lora_id = request.lora_int_id
            if not self._grammar_ready(request) or (
                    lora_id and lora_id not in running_loras and len(running_loras) >= (self.max_loras or 0)):
                skipped.append(self.waiting.popleft())
                continue
            hits, num_hit_tokens = self.kv_cache_manager.get_computed_blocks(request)
            num_new = request.num_tokens - num_hit_tokens
            if (not self.config.enable_chunked_prefill or request.pooling_params is not None) and num_new > budget:
                break
            num_new = min(num_new, budget)
            new_blocks = self.kv_cache_manager.allocate_slots(request, num_new, hits, self.num_lookahead_tokens)
            if new_blocks is None:
                break
            self.waiting.popleft()
            self._admit(request, hits, num_hit_tokens, num_new, new_blocks)
            scheduled.append((request, num_new))
            budget -= num_new
            if lora_id:
                running_loras.add(lora_id)
        self.waiting.extendleft(reversed(skipped))

        return self._output(scheduled, preempted)

    def _newest_preemptible(self) -> Request:
        """The most recently admitted running request whose step is not in flight (the one being
        scheduled is such a request, so there always is one)."""
        return next(r for r in reversed(self.running) if r.request_id not in self.in_flight)

    def keep_finished_for_next_step(self, scheduler_output: SchedulerOutput) -> None:
        """A step that will not run (nothing was scheduled while others are in flight) hands the
        requests ended since the last step on to the next one, so the workers still hear of them."""
        self._finished_since_last_step |= scheduler_output.finished_req_ids

    def running_lora_ids(self) -> set[int]:
        """The adapters of the running requests: never more than `max_loras`."""
        return {r.lora_int_id for r in self.running if r.lora_int_id}

    def _grammar_ready(self, request: Request) -> bool:
        """Whether a waiting request can start: no constraint, or its grammar compiled. A constraint that
        fails to compile (the frontend checked it, so this is rare) is recorded in `grammar_failures`;
        the engine core fails that request (`EngineCore.step`)."""
        if request.structured_output_request is None:
            return True
        try:
            return self.structured_output_manager.is_ready(request)
        except Exception as e:
            self.grammar_failures[request.request_id] = f"{type(e).__name__}: {e}"
            return False

    def schedule_alone(self, request_id: str) -> SchedulerOutput:
        """A step for one request only, whichever queue it is in: how a step that failed finds which
        of its requests broke it (`EngineCore.step`). It preempts nobody; the others wait a step."""
        request = self.requests.get(request_id)
        scheduled: list[tuple[Request, int]] = []
        budget = self.config.max_num_batched_tokens
        if request is not None and request.status == RequestStatus.RUNNING:
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            new_blocks = (self.kv_cache_manager.allocate_slots(request, num_new, num_lookahead_tokens=self.num_lookahead_tokens)
                          if num_new > 0 else None)
            if new_blocks is not None:
                self.tracer.scheduled(request, num_new, new_blocks)
                scheduled.append((request, num_new))
        elif request is not None and request in self.waiting and self._grammar_ready(request):
            hits, num_hit_tokens = self.kv_cache_manager.get_computed_blocks(request)
            num_new = min(request.num_tokens - num_hit_tokens, budget)
            new_blocks = self.kv_cache_manager.allocate_slots(request, num_new, hits, self.num_lookahead_tokens)
            if new_blocks is not None:
                self.waiting.remove(request)
                self._admit(request, hits, num_hit_tokens, num_new, new_blocks)
                scheduled.append((request, num_new))
        return self._output(scheduled, set())

    def _output(self, scheduled: list[tuple[Request, int]], preempted: set[str]) -> SchedulerOutput:
        """The step's decisions for the runner, with the grammar bitmask of its constrained requests; the
        requests ended since the last step go with them once."""
        out = SchedulerOutput(
            scheduled=[self._make_scheduled(r, n) for r, n in scheduled],
            num_batched_tokens=sum(n for _, n in scheduled),
            finished_req_ids=self._finished_since_last_step,
            preempted_req_ids=preempted,
        )
        self._finished_since_last_step = set()
        if self.structured_output_manager is not None:
            sampling = [r for (r, _), s in zip(scheduled, out.scheduled) if s.sample]
            grammar = self.structured_output_manager.grammar_bitmask(sampling)
            if grammar is not None:
                out.grammar_bitmask, out.structured_output_request_ids = grammar
        return out

    def step_failed(self, scheduler_output: SchedulerOutput) -> None:
        """Put back what a step that raised left half done, so that each of its requests can run the
        same chunk or decode again (alone: `schedule_alone`).

        The runner never saw the requests that had finished since the previous step. The blocks the
        step was to fill hold no K/V, yet were already registered in the prefix cache: they are taken
        out of it. A request that counted one of them as computed (a prefix hit on a block another
        request of the same step was filling) must recompute: it goes back to the waiting queue, as
        after a preemption (not counted as one). The others keep their blocks and their place.
        """
        self._finished_since_last_step |= scheduler_output.finished_req_ids
        requests = [self.requests[s.request_id] for s in scheduler_output.scheduled
                    if s.request_id in self.requests and self.requests[s.request_id].status == RequestStatus.RUNNING]
        kv = self.kv_cache_manager
        unwritten: set[int] = set()
        for request in requests:
            unwritten |= kv.uncache_from(request, request.num_computed_tokens)
        for request in reversed(requests):
            if kv.computed_block_ids(request) & unwritten:
                self.running.remove(request)
                self._preempt(request, count=False)

    def _preempt(self, request: Request, count: bool = True) -> None:
        """Free everything the request holds; it will recompute prompt and output later."""
        released = self.kv_cache_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.spec_token_ids = []
        if count:
            request.num_preemptions += 1
            self.num_preemptions += 1
        self.waiting.appendleft(request)
        self.tracer.preempted(request, released)
        logger.debug("preempted %s (%d tokens)", request.request_id, request.num_tokens)

    def _admit(self, request: Request, hits: list[KVCacheBlock], num_hit_tokens: int, num_new: int,
               new_blocks: list[KVCacheBlock]) -> None:
        """A waiting request that got its blocks joins the running ones (at the end: the newest)."""
        self.tracer.admitted(request, hits, num_hit_tokens, num_new, new_blocks, resumed=request.num_preemptions > 0)
        self.kv_cache_manager.record_prefix_cache_lookup(request.num_tokens, num_hit_tokens)
        if request.num_cached_tokens < 0:
            request.num_cached_tokens = num_hit_tokens
        request.num_computed_tokens = num_hit_tokens
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    def _make_scheduled(self, request: Request, num_new: int) -> ScheduledRequest:
        start = request.num_computed_tokens
        params = request.sampling_params
        end = start + num_new
        spec = request.spec_token_ids[: max(0, end - request.num_tokens)]
        return ScheduledRequest(
            request_id=request.request_id,
            token_ids=request.all_token_ids[start:end] + spec if spec else request.all_token_ids[start:end],
            num_computed_tokens=start,
            block_ids=self.kv_cache_manager.get_block_ids(request.request_id),
            group_block_ids=self.kv_cache_manager.get_group_block_ids(request.request_id),
            sampling_params=params,
            prompt_token_ids=request.prompt_token_ids,
            output_token_ids=request.output_token_ids,
            sample=end >= request.num_tokens and request.pooling_params is None,
            compute_prompt_logprobs=params.prompt_logprobs is not None
            and start < request.num_prompt_tokens - 1
            and request.num_output_tokens == 0,
            pooling_params=request.pooling_params,
            lora_request=request.lora_request,
            mm_features=[f for f in request.mm_features if f.overlaps(start, start + num_new)],
            spec_token_ids=spec,
        )

    # ----- after the model ran ----------------------------------------------------
    def update_from_output(
        self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput
    ) -> list[Request]:
        """Advance computed tokens, append sampled ones, and end requests that stopped.

        Returns the requests that received a new token this step (finished ones included).
        """
        updated = []
        for sched in scheduler_output.scheduled:
            request = self.requests.get(sched.request_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue
            num_drafts = len(sched.spec_token_ids)
            num_accepted = runner_output.num_accepted_tokens.get(sched.request_id, 0)
            # Rejected drafts' K/V was written but is not the sequence's: their positions count as not computed.
            request.num_computed_tokens += len(sched.token_ids) - (num_drafts - num_accepted)
            if request.pooling_params is not None:
                pooled = runner_output.pooler_output.get(sched.request_id)
                if pooled is not None:  # the whole prompt ran: the request is done
                    request.pooler_output = pooled
                    request.status = RequestStatus.FINISHED_STOPPED
                    updated.append(request)
                    self.running.remove(request)
                    self._free(request)
                continue
            token_id = runner_output.sampled_token_ids.get(sched.request_id)
            if token_id is None:
                continue
            if num_drafts:
                self.spec_decoding_stats.observe(num_drafts, num_accepted)
            # Accepted drafts, then the sampled token; a stop or the length inside the run ends it there.
            for token_id in sched.spec_token_ids[:num_accepted] + [token_id]:
                request.append_output_token(token_id)
                if request.structured_output_request is not None:
                    self.structured_output_manager.accept_token(request, token_id)
                self._check_stop(request, token_id)
                if request.is_finished:
                    break
            updated.append(request)
            if request.is_finished:
                self.running.remove(request)
                self._free(request)
            elif num_drafts or request.spec_token_ids or runner_output.draft_token_ids:
                self._set_drafts(request, runner_output.draft_token_ids.get(sched.request_id, []))
        return updated

    def _set_drafts(self, request: Request, drafts: list[int]) -> None:
        """Keep the runner's proposals for the next step, no more than the request may still emit (the step
        after them emits one more token); release the blocks that only held this step's rejected drafts.
        A request with a structured-output constraint gets none (its grammar would have to vet them)."""
        room = max(request.max_tokens - request.num_output_tokens - 1, 0)
        request.spec_token_ids = drafts[:room] if request.structured_output_request is None else []
        self.kv_cache_manager.free_blocks_past(request, request.num_tokens + self.num_lookahead_tokens)

    def _check_stop(self, request: Request, token_id: int) -> None:
        params = request.sampling_params
        is_stop = token_id in params.stop_token_ids or (
            token_id in params.all_stop_token_ids and not params.ignore_eos
        )
        if request.num_output_tokens >= params.min_tokens and is_stop:
            request.status = RequestStatus.FINISHED_STOPPED
            # EOS ends a request with no stop_reason; a user's stop token id is the reason.
            if token_id in params.stop_token_ids:
                request.stop_reason = token_id
        elif request.num_output_tokens >= request.max_tokens:
            request.status = RequestStatus.FINISHED_LENGTH_CAPPED

    def snapshot(self) -> SchedulerState:
        """The queues as plain data, for the engine-state view (`core/snapshot.py`)."""
        # Requests carry time.monotonic() arrivals; the snapshot speaks time.time() throughout.
        wall_offset = time.time() - time.monotonic()
        return SchedulerState(running=[self._request_info(r, wall_offset) for r in self.running],
                              waiting=[self._request_info(r, wall_offset) for r in self.waiting])

    def _request_info(self, request: Request, wall_offset: float) -> RequestInfo:
        status = {RequestStatus.RUNNING: "running", RequestStatus.PREEMPTED: "preempted"}.get(request.status, "waiting")
        return RequestInfo(
            request_id=request.request_id,
            parent_id=request.request_id,
            status=status,
            num_prompt_tokens=request.num_prompt_tokens,
            num_computed_tokens=request.num_computed_tokens,
            num_output_tokens=request.num_output_tokens,
            max_tokens=request.max_tokens,
            num_cached_tokens=request.num_cached_tokens,
            num_preemptions=request.num_preemptions,
            block_ids=self.kv_cache_manager.get_block_ids(request.request_id),
            arrival_time=request.arrival_time + wall_offset,
        )
