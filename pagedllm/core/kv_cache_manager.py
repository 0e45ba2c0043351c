"""The KV-cache manager: answers the scheduler's questions about blocks for one request.

It owns each running request's block list (its block table) and keeps the pool's
invariants: a block is either referenced by requests (ref_cnt > 0) or in the free queue,
never both; after every request ends, every block is free (and possibly cached).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from pagedllm.core.block_pool import BlockPool, KVCacheBlock
from pagedllm.core.snapshot import BlockInfo, KVCacheState
from pagedllm.request import Request
from pagedllm.utils import cdiv


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.block_pool = BlockPool(num_blocks, enable_caching)
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        self._num_cached_blocks: dict[str, int] = {}
        # Prefix-cache counters, in tokens, as vLLM reports them.
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    @property
    def num_blocks(self) -> int:
        return self.block_pool.num_blocks

    def usage(self) -> float:
        return self.block_pool.usage()

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """The longest cached prefix of a waiting request, in whole blocks.

        At least the last token is always left to compute, because its logits are needed.
        Requests asking for prompt logprobs skip the cache: those logprobs need every
        prompt position to run through the model.
        """
        if not self.enable_caching or request.sampling_params.prompt_logprobs is not None:
            return [], 0
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVCacheBlock] = []
        for block_hash in request.block_hashes[:max_hit_blocks]:
            block = self.block_pool.get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def record_prefix_cache_lookup(self, num_queried_tokens: int, num_hit_tokens: int) -> None:
        """Count a lookup once the request is admitted (a retried admission counts once)."""
        self.prefix_cache_queries += num_queried_tokens
        self.prefix_cache_hits += num_hit_tokens

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_blocks: list[KVCacheBlock] | None = None,
        num_lookahead_tokens: int = 0,
    ) -> list[KVCacheBlock] | None:
        """Give `request` room for `num_new_tokens` more tokens, or return None if it can't.

        `new_computed_blocks` are prefix-cache hits found for a newly admitted request.
        `num_lookahead_tokens` more slots are reserved past them, for a draft model's proposals.
        On success the blocks that will be completely written this step are registered in
        the prefix cache right away, so a request scheduled later in the same step can
        already share them (the KV is written before attention reads it, layer by layer).
        """
        new_computed_blocks = new_computed_blocks or []
        req_blocks = self.req_to_blocks.setdefault(request.request_id, [])
        num_computed = request.num_computed_tokens + len(new_computed_blocks) * self.block_size
        total_tokens = num_computed + num_new_tokens
        num_needed = (cdiv(total_tokens + num_lookahead_tokens, self.block_size) - len(req_blocks)
                      - len(new_computed_blocks))
        # Cache hits sitting in the free queue stop being free once we reference them.
        num_evictable_hits = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        if max(num_needed, 0) + num_evictable_hits > self.block_pool.num_free_blocks:
            return None
        if new_computed_blocks:
            self.block_pool.touch(new_computed_blocks)
            req_blocks.extend(new_computed_blocks)
        new_blocks = self.block_pool.get_new_blocks(num_needed) if num_needed > 0 else []
        req_blocks.extend(new_blocks)
        if self.enable_caching:
            self._cache_full_blocks(request, req_blocks, min(total_tokens, request.num_tokens))
        return new_blocks

    def _cache_full_blocks(self, request: Request, blocks: list[KVCacheBlock], num_tokens: int) -> None:
        start = self._num_cached_blocks.get(request.request_id, 0)
        end = min(num_tokens // self.block_size, len(request.block_hashes))
        for i in range(start, end):
            self.block_pool.cache_block(blocks[i], request.block_hashes[i])
        self._num_cached_blocks[request.request_id] = max(start, end)

    def uncache_from(self, request: Request, num_computed_tokens: int) -> set[int]:
        """Take the request's blocks past its first `num_computed_tokens` tokens out of the prefix
        cache: a step meant to fill them failed, so their K/V is not there. They are registered again
        when a later step allocates for them. Returns the ids of the blocks that were registered."""
        blocks = self.req_to_blocks.get(request.request_id, [])
        first = num_computed_tokens // self.block_size
        uncached = {block.block_id for block in blocks[first:] if block.block_hash is not None}
        for block in blocks[first:]:
            self.block_pool.uncache_block(block)
        cached = self._num_cached_blocks.get(request.request_id)
        if cached is not None:
            self._num_cached_blocks[request.request_id] = min(cached, first)
        return uncached

    def free_blocks_past(self, request: Request, num_tokens: int) -> None:
        """Release the request's blocks past the ones its first `num_tokens` tokens need: blocks that only held
        rejected draft tokens' K/V (speculative decoding). They were never registered in the prefix cache
        (only accepted tokens are hashed), so they go back to the front of the free queue, handed out before
        any block that still caches a prefix."""
        blocks = self.req_to_blocks.get(request.request_id)
        keep = cdiv(num_tokens, self.block_size)
        if blocks is None or len(blocks) <= keep:
            return
        tail = blocks[keep:]
        del blocks[keep:]
        self.block_pool.free_blocks(reversed(tail), evict_first=True)

    def computed_block_ids(self, request: Request) -> set[int]:
        """The blocks the request counts as computed: its full blocks below `num_computed_tokens`."""
        blocks = self.req_to_blocks.get(request.request_id, [])
        return {block.block_id for block in blocks[: request.num_computed_tokens // self.block_size]}

    def free(self, request: Request) -> list[KVCacheBlock]:
        """Release a request's blocks, tail first, so shared prefixes are evicted last.

        Returns them in the order they were released (for the request trace).
        """
        blocks = self.req_to_blocks.pop(request.request_id, [])
        self._num_cached_blocks.pop(request.request_id, None)
        released = blocks[::-1]
        self.block_pool.free_blocks(released)
        return released

    @contextmanager
    def scratch_block(self) -> Iterator[int | None]:
        """A free block to write throw-away K/V into, free again afterwards (None when none is).

        Taking it evicts whatever prefix it cached, since its K/V is overwritten."""
        if self.block_pool.num_free_blocks == 0:
            yield None
            return
        (block,) = self.block_pool.get_new_blocks(1)
        try:
            yield block.block_id
        finally:
            self.block_pool.free_blocks([block])

    def get_block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_to_blocks.get(request_id, [])]

    def get_group_block_ids(self, request_id: str) -> tuple[list[int], ...]:
        """One block table per KV-cache group when there are several (`core/sliding_window_manager.py`)."""
        return ()

    def reset_prefix_cache(self) -> bool:
        return self.block_pool.reset_prefix_cache()

    def snapshot(self) -> KVCacheState:
        """Every block in use with its owners, and the free blocks still cached, as plain data.

        Walks the block tables rather than every block, so the cost follows what is in use: about
        3 ms for 8192 blocks with 48 requests running on a busy 2-core CPU.
        """
        pool = self.block_pool
        owners: dict[int, list[str]] = {}
        held: dict[int, KVCacheBlock] = {}
        for request_id, blocks in self.req_to_blocks.items():
            for block in blocks:
                owners.setdefault(block.block_id, []).append(request_id)
                held[block.block_id] = block
        in_use = [
            BlockInfo(block_id=b.block_id, ref_cnt=b.ref_cnt, state="shared" if b.ref_cnt > 1 else "used",
                      owners=owners[b.block_id], cached=pool.is_cached(b))
            for b in sorted(held.values(), key=lambda b: b.block_id)
        ]
        cached_free = pool.cached_free_block_ids()
        return KVCacheState(
            num_blocks=pool.num_blocks,
            block_size=self.block_size,
            enable_prefix_caching=self.enable_caching,
            usage=self.usage(),
            num_free_blocks=pool.num_free_blocks,
            num_cached_blocks=len(cached_free),
            blocks=in_use,
            cached_block_ids=cached_free,
        )
