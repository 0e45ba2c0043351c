"""The KV-cache manager of a model with local layers, without a model: one block table per group, blocks
that leave a local group's window go back to the pool, and prefix hits are found per group."""

from __future__ import annotations

from pagedllm.model_executor.kv_cache_groups import KVCacheGroupSpec, max_blocks_per_request
from pagedllm.core.sliding_window_manager import SlidingWindowKVCacheManager
from pagedllm.request import Request
from pagedllm.sampling_params import SamplingParams

BLOCK_SIZE = 4
WINDOW = 6  # a query sees itself and 5 keys before it: at most 3 blocks of 4, with the one it writes
GROUPS = [KVCacheGroupSpec((0,), WINDOW), KVCacheGroupSpec((1,), None)]  # one local layer, one global


def make_request(request_id: str, prompt: list[int]) -> Request:
    return Request(request_id, list(prompt), SamplingParams(max_tokens=64), 64, BLOCK_SIZE)


def run_to_end(manager: SlidingWindowKVCacheManager, request: Request, num_tokens: int, chunk: int) -> list[list[int]]:
    """Feed the request `chunk` tokens a step up to `num_tokens` (prompt, then made-up outputs);
    return the real blocks each group holds after each step."""
    held = []
    hits, num_hit = manager.get_computed_blocks(request)
    request.num_computed_tokens = 0
    first = True
    while request.num_computed_tokens < num_tokens:
        if request.num_computed_tokens >= request.num_tokens:
            request.append_output_token(7)
        num_new = min(chunk, request.num_tokens - request.num_computed_tokens - (num_hit if first else 0))
        assert manager.allocate_slots(request, num_new, hits if first else None) is not None
        request.num_computed_tokens += num_new + (num_hit if first else 0)
        first = False
        held.append(manager.num_group_blocks(request.request_id))
    return held


def test_local_group_holds_its_window_and_the_global_group_everything():
    manager = SlidingWindowKVCacheManager(64, BLOCK_SIZE, enable_caching=False, groups=GROUPS)
    request = make_request("a", list(range(10)))
    held = run_to_end(manager, request, 60, chunk=3)
    bound = max_blocks_per_request([GROUPS[0]], 10**6, BLOCK_SIZE, chunk_tokens=3)
    assert max(local for local, _ in held) <= bound == 3
    assert held[-1][1] == 15  # 60 tokens of 4 in the global group
    table = manager.get_group_block_ids("a")[0]
    assert table[:12] == [manager.null_block.block_id] * 12  # what left the window is the null block
    manager.free(request)
    assert manager.block_pool.num_free_blocks == 64


def test_prefix_hit_needs_every_global_block_and_only_the_local_window():
    manager = SlidingWindowKVCacheManager(64, BLOCK_SIZE, enable_caching=True, groups=GROUPS)
    prompt = list(range(100, 121))  # 21 tokens: 5 full blocks may hit
    first = make_request("a", prompt)
    run_to_end(manager, first, len(prompt), chunk=8)
    manager.free(first)
    second = make_request("b", prompt)
    hits, num_hit = manager.get_computed_blocks(second)
    assert num_hit == 20
    local, global_ = hits.per_group
    assert len(global_) == 5 and manager.null_block not in global_
    # The query at position 20 sees keys 15..20: blocks 3 and 4 of the local group, not 0-2.
    assert local[:3] == [manager.null_block] * 3 and manager.null_block not in local[3:]
    assert len(hits) == 7  # the real blocks, as the scheduler and the trace count them
    assert manager.allocate_slots(second, 1, hits) is not None
    assert [b.block_id for b in hits] == [b.block_id for b in local[3:] + global_]
    manager.free(second)
    assert manager.block_pool.num_free_blocks == 64


def test_no_local_hit_without_the_window_blocks():
    manager = SlidingWindowKVCacheManager(64, BLOCK_SIZE, enable_caching=True, groups=GROUPS)
    prompt = list(range(100, 121))
    first = make_request("a", prompt)
    run_to_end(manager, first, len(prompt), chunk=8)
    manager.free(first)
    # Evict the local group's block 4 (positions 16-19): a hit can then stop at 16 tokens at most,
    # whose query (position 16) sees keys 11-16 in blocks 2-3, both still cached.
    block_4 = manager.block_pool.get_cached_block((0, first.block_hashes[4]))
    manager.block_pool.uncache_block(block_4)
    _, num_hit = manager.get_computed_blocks(make_request("b", prompt))
    assert num_hit == 16


def test_failed_step_uncaches_the_unwritten_blocks_of_every_group():
    manager = SlidingWindowKVCacheManager(64, BLOCK_SIZE, enable_caching=True, groups=GROUPS)
    request = make_request("a", list(range(100, 116)))
    assert manager.allocate_slots(request, 16) is not None
    uncached = manager.uncache_from(request, 0)
    assert len(uncached) == 8  # 4 full blocks in each group
    assert manager.get_computed_blocks(make_request("b", list(range(100, 116))))[1] == 0
