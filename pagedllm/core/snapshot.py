"""What the scheduler and the KV-cache manager hold, copied into plain data for the engine-state view.

`KVCacheManager.snapshot()` and `Scheduler.snapshot()` fill these between two steps; the engine
core adds its counters and history (`engine/engine_state.py`) and the result is what
`LLM.get_engine_state()`, `GET /v1/engine/state` and `/dashboard` show. Built from block reference
counts, hashes, block tables and queues only, never from tensors, so a snapshot pickles across
the engine-core pipe.

Each block is in one of four states, the colours of the dashboard's grid:

- `free`: in the free queue, holding nothing findable;
- `used`: in one request's block table (`ref_cnt == 1`);
- `shared`: in several block tables (`ref_cnt > 1`): a prefix-cache hit, or the prompt of n > 1;
- `cached`: free (evictable) but still findable under its prefix hash until the free queue hands
  it out again.

A `used` or `shared` block may also be registered in the prefix cache (`BlockInfo.cached`): a full
block that later requests with the same prefix will share.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    # The user's request id; equal to request_id unless n > 1. The core does not know it: the
    # frontend that fanned the request out fills it in.
    parent_id: str
    status: str  # "waiting", "running" or "preempted" (waiting again, to be recomputed)
    num_prompt_tokens: int
    num_computed_tokens: int  # tokens (prompt and output) whose KV is in the cache
    num_output_tokens: int
    max_tokens: int
    num_cached_tokens: int  # prefix-cache hit when first admitted; -1 before that
    num_preemptions: int
    block_ids: list[int]  # the block table
    arrival_time: float  # time.time() clock


@dataclass
class SchedulerState:
    running: list[RequestInfo]  # in admission order (the newest is preempted first)
    waiting: list[RequestInfo]  # in admission order (preempted requests go to the front)
