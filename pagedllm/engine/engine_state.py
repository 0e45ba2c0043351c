"""A snapshot of what the engine holds right now: KV blocks, queues, counters, recent history.

This is what `LLMEngine.get_engine_state()`, `LLM.get_engine_state()` and the server's
`GET /v1/engine/state` return, and what the `/dashboard` page draws. It is built from plain
Python state only (block reference counts and hashes, the block tables, the scheduler's queues),
never from tensors. It is plain data: it pickles across the engine-core pipe, and `to_dict()` is
its JSON.

Each block is in one of four states, the colours of the dashboard's grid:

- `free`: in the free queue, holding nothing findable;
- `used`: in one request's block table (`ref_cnt == 1`);
- `shared`: in several block tables (`ref_cnt > 1`): a prefix-cache hit, or the prompt of n > 1;
- `cached`: free (evictable) but still findable under its prefix hash until the free queue hands
  it out again.

Taking it costs a pass over the block tables and the free queue, never the model: about 3 ms
for 8192 blocks with 48 requests running, on a busy 2-core CPU; the dashboard asks twice a second.

A `used` or `shared` block may also be registered in the prefix cache (`BlockInfo.cached`): a full
block that later requests with the same prefix will share.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from pagedllm.core.block_pool import KVCacheBlock
from pagedllm.engine.request import Request, RequestStatus

if TYPE_CHECKING:
    from pagedllm.engine.llm_engine import LLMEngine

BLOCK_STATES = ("free", "used", "shared", "cached")


@dataclass
class BlockInfo:
    """A block some request holds; blocks not listed are free or cached."""

    block_id: int
    ref_cnt: int
    state: str  # "used" or "shared"
    owners: list[str]  # ids of the requests whose block tables hold it (len == ref_cnt)
    cached: bool  # registered under its prefix hash, so later requests can share it


@dataclass
class KVCacheState:
    num_blocks: int
    block_size: int
    enable_prefix_caching: bool
    usage: float  # fraction of blocks held by requests, as kv_cache_usage_perc
    num_free_blocks: int  # free queue length: plain free and cached blocks together
    num_cached_blocks: int  # free blocks still holding a findable prefix
    blocks: list[BlockInfo]  # the blocks in use, by block id
    cached_block_ids: list[int]  # free but cached, in eviction order (first evicted first)

    def block_states(self) -> list[str]:
        """The state of every block, indexed by block id."""
        states = ["free"] * self.num_blocks
        for block_id in self.cached_block_ids:
            states[block_id] = "cached"
        for block in self.blocks:
            states[block.block_id] = block.state
        return states


@dataclass
class RequestInfo:
    """One sequence in a queue (a user request with n > 1 shows as n of these)."""

    request_id: str
    parent_id: str  # the user's request id; equal to request_id unless n > 1
    status: str  # "waiting", "running" or "preempted" (waiting again, to be recomputed)
    num_prompt_tokens: int
    num_computed_tokens: int  # tokens (prompt and output) whose KV is in the cache
    num_output_tokens: int
    max_tokens: int
    num_cached_tokens: int  # prefix-cache hit when first admitted; -1 before that
    num_preemptions: int
    block_ids: list[int]  # the block table
    arrival_time: float  # time.time() clock

    @property
    def num_computed_prompt_tokens(self) -> int:
        return min(self.num_computed_tokens, self.num_prompt_tokens)


@dataclass
class Counters:
    """Monotonic since the engine started (the same figures as /metrics)."""

    num_preemptions: int
    prefix_cache_queries: int  # in tokens, as vLLM counts them
    prefix_cache_hits: int
    prompt_tokens: int
    generation_tokens: int
    requests_finished: int
    num_steps: int


@dataclass
class HistorySample:
    """The counters at one moment; the dashboard's charts are the differences between samples."""

    time: float
    prompt_tokens: int
    generation_tokens: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    kv_cache_usage: float
    num_running: int
    num_waiting: int


@dataclass
class PreemptionInfo:
    time: float
    request_id: str
    num_tokens: int


@dataclass
class EngineState:
    time: float  # time.time() when taken
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    kv_cache: KVCacheState
    running: list[RequestInfo]  # in admission order (the newest is preempted first)
    waiting: list[RequestInfo]  # in admission order (preempted requests go to the front)
    counters: Counters
    recent_preemptions: list[PreemptionInfo]  # the last few, oldest first
    history: list[HistorySample] = field(default_factory=list)  # oldest first

    def to_dict(self) -> dict[str, Any]:
        """The JSON body of `GET /v1/engine/state`."""
        return asdict(self)


class StateHistory:
    """Counters sampled at most once per `interval` seconds, over the last `span` seconds.

    Sampled after engine steps and whenever a snapshot is taken, so while a dashboard watches,
    idle periods show as flat lines rather than gaps.
    """

    def __init__(self, interval: float = 1.0, span: float = 300.0) -> None:
        self.interval = interval
        self.samples: deque[HistorySample] = deque(maxlen=max(1, int(span / interval)))
        self._last = 0.0

    def maybe_record(self, engine: "LLMEngine", force: bool = False) -> None:
        now = time.time()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        s, c = engine.scheduler, engine.counters
        kv = engine.kv_cache_manager
        self.samples.append(HistorySample(now, c.prompt_tokens, c.generation_tokens, kv.prefix_cache_queries,
                                          kv.prefix_cache_hits, kv.usage(), len(s.running), len(s.waiting)))


def _request_info(engine: "LLMEngine", request: Request, wall_offset: float) -> RequestInfo:
    parent = engine.output_processor.child_to_parent.get(request.request_id)
    if request.status == RequestStatus.RUNNING:
        status = "running"
    elif request.status == RequestStatus.PREEMPTED:
        status = "preempted"
    else:
        status = "waiting"
    return RequestInfo(
        request_id=request.request_id,
        parent_id=parent[0] if parent else request.request_id,
        status=status,
        num_prompt_tokens=request.num_prompt_tokens,
        num_computed_tokens=request.num_computed_tokens,
        num_output_tokens=request.num_output_tokens,
        max_tokens=request.max_tokens,
        num_cached_tokens=request.num_cached_tokens,
        num_preemptions=request.num_preemptions,
        block_ids=engine.kv_cache_manager.get_block_ids(request.request_id),
        arrival_time=request.arrival_time + wall_offset,
    )


def build_engine_state(engine: "LLMEngine", history: Optional[StateHistory] = None) -> EngineState:
    """Walk the block pool, the block tables and the queues once; copy what they say."""
    kv = engine.kv_cache_manager
    pool = kv.block_pool
    # From the block tables rather than a walk over every block: the cost follows what is in use.
    owners: dict[int, list[str]] = {}
    held: dict[int, KVCacheBlock] = {}
    for request_id, blocks in kv.req_to_blocks.items():
        for block in blocks:
            owners.setdefault(block.block_id, []).append(request_id)
            held[block.block_id] = block
    in_use = [
        BlockInfo(block_id=b.block_id, ref_cnt=b.ref_cnt, state="shared" if b.ref_cnt > 1 else "used",
                  owners=owners[b.block_id], cached=pool.is_cached(b))
        for b in sorted(held.values(), key=lambda b: b.block_id)
    ]
    cached_free = pool.cached_free_block_ids()
    kv_state = KVCacheState(
        num_blocks=pool.num_blocks,
        block_size=kv.block_size,
        enable_prefix_caching=kv.enable_caching,
        usage=kv.usage(),
        num_free_blocks=pool.num_free_blocks,
        num_cached_blocks=len(cached_free),
        blocks=in_use,
        cached_block_ids=cached_free,
    )
    # Requests carry time.monotonic() arrivals; the snapshot speaks time.time() throughout.
    wall_offset = time.time() - time.monotonic()
    scheduler = engine.scheduler
    sc = engine.config.scheduler_config
    counters = Counters(
        num_preemptions=scheduler.num_preemptions,
        prefix_cache_queries=kv.prefix_cache_queries,
        prefix_cache_hits=kv.prefix_cache_hits,
        prompt_tokens=engine.counters.prompt_tokens,
        generation_tokens=engine.counters.generation_tokens,
        requests_finished=engine.counters.requests_finished,
        num_steps=engine.counters.num_steps,
    )
    if history is not None:
        history.maybe_record(engine)
    return EngineState(
        time=time.time(),
        max_model_len=engine.config.model_config.max_model_len,
        max_num_seqs=sc.max_num_seqs,
        max_num_batched_tokens=sc.max_num_batched_tokens,
        kv_cache=kv_state,
        running=[_request_info(engine, r, wall_offset) for r in scheduler.running],
        waiting=[_request_info(engine, r, wall_offset) for r in scheduler.waiting],
        counters=counters,
        recent_preemptions=[PreemptionInfo(e.time, e.request_id, e.num_tokens) for e in scheduler.recent_preemptions],
        history=list(history.samples) if history is not None else [],
    )
