"""The KV-cache allocator without a model: the block pool and the manager on top of it.

The pool keeps reference counts, an LRU queue of free blocks and the prefix-cache map;
the manager hands a request its block table and finds its cached prefix. These tests pin
the contract the scheduler relies on.
"""

from __future__ import annotations

import pytest

from pagedllm.core.block_pool import BlockPool
from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.request import Request
from pagedllm.sampling_params import SamplingParams

BLOCK_SIZE = 4


def make_request(request_id: str, prompt: list[int], block_size: int = BLOCK_SIZE, **params) -> Request:
    sampling_params = SamplingParams(max_tokens=16, **params)
    return Request(request_id, list(prompt), sampling_params, 16, block_size)


def admit(manager: KVCacheManager, request: Request) -> int:
    """Admit a waiting request the way the scheduler does: look up its prefix, allocate the rest."""
    hits, num_hit_tokens = manager.get_computed_blocks(request)
    num_new = request.num_tokens - num_hit_tokens
    assert manager.allocate_slots(request, num_new, hits) is not None
    request.num_computed_tokens = request.num_tokens
    return num_hit_tokens


def free_ids(pool: BlockPool) -> list[int]:
    """Block ids in the free queue, in eviction order (first = evicted first)."""
    return list(pool._free)


# ----- block pool -----------------------------------------------------------------------


def test_pool_needs_at_least_one_block():
    with pytest.raises(ValueError):
        BlockPool(0, enable_caching=True)


def test_get_new_blocks_takes_from_free_list_front():
    pool = BlockPool(5, enable_caching=True)
    blocks = pool.get_new_blocks(2)
    assert [b.block_id for b in blocks] == [0, 1]
    assert all(b.ref_cnt == 1 for b in blocks)
    assert pool.num_free_blocks == 3
    assert free_ids(pool) == [2, 3, 4]
    assert pool.usage() == pytest.approx(2 / 5)


def test_get_new_blocks_beyond_free_raises_and_changes_nothing():
    pool = BlockPool(3, enable_caching=True)
    pool.get_new_blocks(2)
    with pytest.raises(ValueError):
        pool.get_new_blocks(2)
    assert free_ids(pool) == [2]
    assert pool.blocks[2].ref_cnt == 0


def test_touch_and_free_move_reference_counts():
    pool = BlockPool(3, enable_caching=True)
    (block,) = pool.get_new_blocks(1)
    pool.touch([block])  # a second request shares it
    assert block.ref_cnt == 2
    pool.free_blocks([block])
    assert block.ref_cnt == 1
    assert block.block_id not in free_ids(pool)
    pool.free_blocks([block])
    assert block.ref_cnt == 0
    assert free_ids(pool)[-1] == block.block_id


def test_touch_pulls_free_cached_block_out_of_free_queue():
    pool = BlockPool(3, enable_caching=True)
    (block,) = pool.get_new_blocks(1)
    pool.cache_block(block, ("h",))
    pool.free_blocks([block])
    assert pool.num_free_blocks == 3
    pool.touch([block])
    assert block.ref_cnt == 1
    assert pool.num_free_blocks == 2
    assert block.block_id not in free_ids(pool)
    assert pool.get_cached_block(("h",)) is block  # a hit keeps its hash


def test_freed_blocks_join_lru_tail_so_oldest_free_is_reused_first():
    pool = BlockPool(4, enable_caching=True)
    b0, b1, b2, b3 = pool.get_new_blocks(4)
    pool.free_blocks([b2])
    pool.free_blocks([b0])
    pool.free_blocks([b3, b1])  # within one call, earlier blocks are evicted earlier
    assert [b.block_id for b in pool.get_new_blocks(4)] == [2, 0, 3, 1]


def test_cached_free_block_found_by_hash_until_reused():
    pool = BlockPool(2, enable_caching=True)
    (block,) = pool.get_new_blocks(1)
    pool.cache_block(block, ("prefix",))
    pool.free_blocks([block])
    assert block.ref_cnt == 0
    assert pool.get_cached_block(("prefix",)) is block  # free, but still cached
    # The untouched block 1 is older in the queue, so it goes first...
    assert [b.block_id for b in pool.get_new_blocks(1)] == [1]
    assert pool.get_cached_block(("prefix",)) is block
    # ...then reusing the cached block evicts its hash.
    assert pool.get_new_blocks(1) == [block]
    assert pool.get_cached_block(("prefix",)) is None
    assert block.block_hash is None
    assert pool.cached_block_hash_to_block == {}


def test_cache_block_keeps_first_block_for_duplicate_hash():
    pool = BlockPool(3, enable_caching=True)
    first, second = pool.get_new_blocks(2)
    pool.cache_block(first, ("same",))
    pool.cache_block(second, ("same",))
    assert pool.get_cached_block(("same",)) is first
    # Reusing the duplicate must not evict the findable one.
    pool.free_blocks([second])
    pool.get_new_blocks(2)  # block 2, then `second`
    assert pool.get_cached_block(("same",)) is first


def test_freeing_a_block_twice_raises():
    pool = BlockPool(2, enable_caching=True)
    (block,) = pool.get_new_blocks(1)
    pool.free_blocks([block])
    with pytest.raises(RuntimeError):
        pool.free_blocks([block])
    assert block.ref_cnt == 0
    assert pool.num_free_blocks == 2


def test_reset_prefix_cache_only_when_nothing_in_use():
    pool = BlockPool(3, enable_caching=True)
    a, b = pool.get_new_blocks(2)
    pool.cache_block(a, ("a",))
    pool.cache_block(b, ("b",))
    pool.free_blocks([a])
    assert pool.reset_prefix_cache() is False
    assert pool.get_cached_block(("a",)) is a  # nothing forgotten
    assert pool.get_cached_block(("b",)) is b
    pool.free_blocks([b])
    assert pool.reset_prefix_cache() is True
    assert pool.cached_block_hash_to_block == {}
    assert all(blk.block_hash is None for blk in pool.blocks)
    assert pool.num_free_blocks == 3


# ----- KV-cache manager: allocation ------------------------------------------------------


def test_allocate_slots_returns_none_without_partial_allocation():
    manager = KVCacheManager(num_blocks=4, block_size=BLOCK_SIZE, enable_caching=True)
    first = make_request("a", range(8))
    admit(manager, first)
    assert manager.block_pool.num_free_blocks == 2
    ref_cnts = [b.ref_cnt for b in manager.block_pool.blocks]

    second = make_request("b", range(100, 112))  # needs 3 blocks, 2 are free
    assert manager.allocate_slots(second, 12) is None
    assert manager.block_pool.num_free_blocks == 2
    assert [b.ref_cnt for b in manager.block_pool.blocks] == ref_cnts
    assert manager.get_block_ids("b") == []


def test_allocate_slots_counts_free_cache_hits_against_free_blocks():
    """Free cached hits stop being free once referenced: they need room too."""
    manager = KVCacheManager(num_blocks=3, block_size=BLOCK_SIZE, enable_caching=True)
    owner = make_request("a", list(range(8)) + [50])  # 2 full blocks + 1 partial
    admit(manager, owner)
    manager.free(owner)
    assert manager.block_pool.num_free_blocks == 3

    sharer = make_request("b", list(range(8)) + [60, 61, 62, 63, 64])  # 4 blocks, 2 of them hits
    hits, num_hit_tokens = manager.get_computed_blocks(sharer)
    assert num_hit_tokens == 8
    assert manager.allocate_slots(sharer, sharer.num_tokens - num_hit_tokens, hits) is None
    assert all(b.ref_cnt == 0 for b in hits)
    assert manager.block_pool.num_free_blocks == 3
    assert manager.get_block_ids("b") == []
    assert manager.get_computed_blocks(sharer)[0] == hits  # still cached


def test_allocation_grows_block_table_only_at_block_boundaries():
    manager = KVCacheManager(num_blocks=4, block_size=BLOCK_SIZE, enable_caching=True)
    request = make_request("a", range(4))
    assert len(manager.allocate_slots(request, 4)) == 1
    request.num_computed_tokens = 4
    request.append_output_token(9)
    assert len(manager.allocate_slots(request, 1)) == 1  # token 5 starts block 2
    request.num_computed_tokens = 5
    request.append_output_token(9)
    assert manager.allocate_slots(request, 1) == []  # token 6 fits in block 2
    assert len(manager.get_block_ids("a")) == 2


def test_free_releases_tail_blocks_before_head_blocks():
    """A freed request's deepest blocks are evicted first; the shared head stays cached longest."""
    manager = KVCacheManager(num_blocks=5, block_size=BLOCK_SIZE, enable_caching=True)
    request = make_request("a", list(range(12)) + [99])  # 3 full blocks + 1 partial
    admit(manager, request)
    table = manager.get_block_ids("a")
    manager.free(request)
    assert free_ids(manager.block_pool) == [4] + table[::-1]
    assert all(b.ref_cnt == 0 for b in manager.block_pool.blocks)

    manager.block_pool.get_new_blocks(3)  # block 4, then the partial and the 3rd full block
    hashes = request.block_hashes
    assert manager.block_pool.get_cached_block(hashes[2]) is None
    assert manager.block_pool.get_cached_block(hashes[1]).block_id == table[1]
    assert manager.block_pool.get_cached_block(hashes[0]).block_id == table[0]


def test_full_blocks_are_cached_as_soon_as_allocated():
    manager = KVCacheManager(num_blocks=4, block_size=BLOCK_SIZE, enable_caching=True)
    request = make_request("a", range(10))
    manager.allocate_slots(request, 6)  # a first chunk: block 0 full, block 1 half
    table = manager.get_block_ids("a")
    pool = manager.block_pool
    assert pool.get_cached_block(request.block_hashes[0]).block_id == table[0]
    assert pool.get_cached_block(request.block_hashes[1]) is None
    request.num_computed_tokens = 6
    manager.allocate_slots(request, 4)
    assert pool.get_cached_block(request.block_hashes[1]).block_id == table[1]


def test_reallocated_request_registers_its_blocks_again():
    """A request freed (e.g. preempted) and allocated anew caches its recomputed blocks."""
    manager = KVCacheManager(num_blocks=4, block_size=BLOCK_SIZE, enable_caching=True)
    request = make_request("a", list(range(8)) + [8])
    admit(manager, request)
    manager.free(request)
    request.num_computed_tokens = 0
    assert manager.reset_prefix_cache()
    manager.allocate_slots(request, request.num_tokens)
    table = manager.get_block_ids("a")
    for i in range(2):
        assert manager.block_pool.get_cached_block(request.block_hashes[i]).block_id == table[i]


# ----- KV-cache manager: prefix cache ----------------------------------------------------


def test_prefix_cache_hit_on_shared_full_blocks():
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE, enable_caching=True)
    first = make_request("a", list(range(8)) + [20, 21])
    assert admit(manager, first) == 0
    second = make_request("b", list(range(8)) + [30, 31, 32])
    hits, num_hit_tokens = manager.get_computed_blocks(second)
    assert [b.block_id for b in hits] == manager.get_block_ids("a")[:2]
    assert num_hit_tokens == 8
    new_blocks = manager.allocate_slots(second, second.num_tokens - num_hit_tokens, hits)
    assert len(new_blocks) == 1
    assert manager.get_block_ids("b")[:2] == manager.get_block_ids("a")[:2]
    assert [b.ref_cnt for b in hits] == [2, 2]


def test_prefix_cache_hit_after_owner_freed():
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE, enable_caching=True)
    first = make_request("a", list(range(8)) + [20])
    admit(manager, first)
    table = manager.get_block_ids("a")
    manager.free(first)
    second = make_request("b", list(range(8)) + [30])
    assert admit(manager, second) == 8
    assert manager.get_block_ids("b")[:2] == table[:2]
    assert manager.block_pool.num_free_blocks == 8 - 3


def test_prefix_cache_hit_leaves_last_token_to_compute():
    """A prompt of exactly 2 full blocks hits only 1: the last token's logits are needed."""
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE, enable_caching=True)
    admit(manager, make_request("a", range(12)))
    second = make_request("b", range(8))
    hits, num_hit_tokens = manager.get_computed_blocks(second)
    assert len(hits) == 1
    assert num_hit_tokens == 4


def test_prompt_logprobs_requests_skip_prefix_cache():
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE, enable_caching=True)
    admit(manager, make_request("a", range(10)))
    second = make_request("b", range(10), prompt_logprobs=0)
    assert manager.get_computed_blocks(second) == ([], 0)


def test_caching_disabled_never_hits():
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE, enable_caching=False)
    first = make_request("a", range(10))
    admit(manager, first)
    assert manager.block_pool.cached_block_hash_to_block == {}
    manager.free(first)
    assert manager.get_computed_blocks(make_request("b", range(10))) == ([], 0)


def test_block_hashes_chain_on_parent_block():
    """The same tokens after a different first block are a different prefix: no hit."""
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE, enable_caching=True)
    shared_block = [5, 6, 7, 8]
    first = make_request("a", [1, 2, 3, 4] + shared_block + [0])
    admit(manager, first)
    second = make_request("b", [9, 9, 9, 9] + shared_block + [0])
    assert second.block_hashes[1] != first.block_hashes[1]
    assert manager.block_pool.get_cached_block(second.block_hashes[1]) is None
    assert manager.get_computed_blocks(second) == ([], 0)


def test_prefix_hit_stops_at_first_missing_block():
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE, enable_caching=True)
    admit(manager, make_request("a", list(range(12)) + [0]))
    diverging = make_request("b", list(range(4)) + [40, 41, 42, 43] + list(range(8, 12)) + [0])
    hits, num_hit_tokens = manager.get_computed_blocks(diverging)
    assert (len(hits), num_hit_tokens) == (1, 4)


def test_request_block_hashes_cover_output_tokens():
    request = make_request("a", range(6))
    assert len(request.block_hashes) == 1
    request.append_output_token(1)
    assert len(request.block_hashes) == 1
    request.append_output_token(2)
    assert len(request.block_hashes) == 2
    assert request.block_hashes[1][1] == (4, 5, 1, 2)
