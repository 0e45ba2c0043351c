"""The KV-cache manager of a model with local (sliding-window) layers: one block table per KV-cache group.

Same questions, same answers as `KVCacheManager` (which it extends, for the block pool, the counters,
the scratch block and the snapshot), but a request holds one block table per group
(`model_executor/kv_cache_groups.py`). A global group keeps every block, as before. A local group gives back
each block once the window of the request's next query has moved past it (vLLM's
`SlidingWindowManager.remove_skipped_blocks`): its place in the table becomes the null block, which
attention never reads (its keys are outside the window), so a local group holds about
`sliding_window / block_size + 1` blocks however long the sequence grows.

Prefix caching works per group: a block is registered under (group, prefix hash) as it fills, and
stays findable after it left the window, until the pool evicts it. A cache hit of k blocks needs
every global group to hold all k, and every local group the blocks that the first query after the
hit still sees; the earlier ones are null.

The null block is the runner's spare block (id `num_blocks`, one past the pool), never handed out.
"""

from __future__ import annotations

from pagedllm.core.block_pool import KVCacheBlock
from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.model_executor.kv_cache_groups import KVCacheGroupSpec
from pagedllm.request import Request
from pagedllm.utils import cdiv


class KVCacheHits(list):
    """A prefix-cache hit: the real blocks of every group as one list (what the scheduler and the trace
    count and print), with the block table each group starts from in `per_group` (null blocks included)."""

    def __init__(self, per_group: list[list[KVCacheBlock]], null_block: KVCacheBlock) -> None:
        super().__init__(b for table in per_group for b in table if b is not null_block)
        self.per_group = per_group


class SlidingWindowKVCacheManager(KVCacheManager):
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool,
                 groups: list[KVCacheGroupSpec]) -> None:
        super().__init__(num_blocks, block_size, enable_caching)
        self.groups = groups
        self.null_block = KVCacheBlock(num_blocks)
        self.req_to_tables: dict[str, list[list[KVCacheBlock]]] = {}
        self._num_cached: dict[str, list[int]] = {}  # per group: table entries registered in the prefix cache

    @property
    def req_to_blocks(self) -> dict[str, list[KVCacheBlock]]:  # the snapshot's view: each request's real blocks
        return {rid: [b for table in tables for b in table if b is not self.null_block]
                for rid, tables in self.req_to_tables.items()}

    @req_to_blocks.setter
    def req_to_blocks(self, value: dict) -> None:  # the base class's constructor sets it; tables live above
        pass

    def _first_needed(self, group: KVCacheGroupSpec, num_computed_tokens: int) -> int:
        """The first block the next query (at position `num_computed_tokens`) still reads in this group."""
        if group.sliding_window is None:
            return 0
        return max(0, num_computed_tokens - group.sliding_window + 1) // self.block_size

    def _key(self, group: int, block_hash: tuple) -> tuple:
        return (group, block_hash)

    # ----- prefix cache -------------------------------------------------------------
    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        if not self.enable_caching or request.sampling_params.prompt_logprobs is not None:
            return [], 0
        hashes = request.block_hashes[: (request.num_tokens - 1) // self.block_size]
        pool = self.block_pool
        cached = [[pool.get_cached_block(self._key(g, h)) for h in hashes] for g in range(len(self.groups))]
        num_hit = len(hashes)
        for g, group in enumerate(self.groups):
            if group.sliding_window is None:
                num_hit = min(num_hit, next((i for i, b in enumerate(cached[g]) if b is None), num_hit))
        while num_hit > 0 and not all(
                all(b is not None for b in cached[g][self._first_needed(group, num_hit * self.block_size):num_hit])
                for g, group in enumerate(self.groups) if group.sliding_window is not None):
            num_hit -= 1
        if num_hit == 0:
            return [], 0
        per_group = []
        for g, group in enumerate(self.groups):
            first = self._first_needed(group, num_hit * self.block_size)
            per_group.append([self.null_block] * first + cached[g][first:num_hit])
        return KVCacheHits(per_group, self.null_block), num_hit * self.block_size

    # ----- allocation -----------------------------------------------------------------
    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_blocks: list[KVCacheBlock] | None = None,
        num_lookahead_tokens: int = 0,
    ) -> list[KVCacheBlock] | None:
        """`num_lookahead_tokens` (a draft model's slots) is always 0 here: speculative decoding is refused
        for models with local layers (`EngineArgs.create_engine_config`)."""
        if num_lookahead_tokens:
            raise ValueError("speculative decoding with sliding-window layers is not supported")
        hits = getattr(new_computed_blocks, "per_group", None) or [[] for _ in self.groups]
        tables = self.req_to_tables.setdefault(request.request_id, [[] for _ in self.groups])
        num_computed = request.num_computed_tokens + len(hits[0]) * self.block_size
        total_tokens = num_computed + num_new_tokens
        self._free_skipped_blocks(tables, num_computed)
        num_needed = [max(0, cdiv(total_tokens, self.block_size) - len(t) - len(h)) for t, h in zip(tables, hits)]
        real_hits = [b for h in hits for b in h if b is not self.null_block]
        num_evictable_hits = sum(1 for b in real_hits if b.ref_cnt == 0)
        if sum(num_needed) + num_evictable_hits > self.block_pool.num_free_blocks:
            return None
        self.block_pool.touch(real_hits)
        new_blocks: list[KVCacheBlock] = []
        for table, hit, count in zip(tables, hits, num_needed):
            table.extend(hit)
            blocks = self.block_pool.get_new_blocks(count) if count else []
            table.extend(blocks)
            new_blocks.extend(blocks)
        if self.enable_caching:
            self._cache_full_blocks_per_group(request, tables, min(total_tokens, request.num_tokens))
        return new_blocks

    def _free_skipped_blocks(self, tables: list[list[KVCacheBlock]], num_computed_tokens: int) -> None:
        """Give back each local group's blocks that the next query's window has left, tail first."""
        for group, table in zip(self.groups, tables):
            first = min(self._first_needed(group, num_computed_tokens), len(table))
            skipped = [b for b in table[:first] if b is not self.null_block]
            if skipped:
                self.block_pool.free_blocks(reversed(skipped))
                table[:first] = [self.null_block] * first

    def _cache_full_blocks_per_group(self, request: Request, tables: list[list[KVCacheBlock]], num_tokens: int) -> None:
        done = self._num_cached.setdefault(request.request_id, [0] * len(self.groups))
        end = min(num_tokens // self.block_size, len(request.block_hashes))
        for g, table in enumerate(tables):
            for i in range(done[g], end):
                if table[i] is not self.null_block:
                    self.block_pool.cache_block(table[i], self._key(g, request.block_hashes[i]))
            done[g] = max(done[g], end)

    def uncache_from(self, request: Request, num_computed_tokens: int) -> set[int]:
        first = num_computed_tokens // self.block_size
        uncached: set[int] = set()
        for table in self.req_to_tables.get(request.request_id, []):
            for block in table[first:]:
                if block is not self.null_block:
                    if block.block_hash is not None:
                        uncached.add(block.block_id)
                    self.block_pool.uncache_block(block)
        done = self._num_cached.get(request.request_id)
        if done is not None:
            done[:] = [min(n, first) for n in done]
        return uncached

    def computed_block_ids(self, request: Request) -> set[int]:
        first = request.num_computed_tokens // self.block_size
        return {b.block_id for table in self.req_to_tables.get(request.request_id, [])
                for b in table[:first] if b is not self.null_block}

    def free(self, request: Request) -> list[KVCacheBlock]:
        tables = self.req_to_tables.pop(request.request_id, [])
        self._num_cached.pop(request.request_id, None)
        released = [b for table in tables for b in reversed(table) if b is not self.null_block]
        self.block_pool.free_blocks(released)
        return released

    def get_block_ids(self, request_id: str) -> list[int]:
        tables = self.req_to_tables.get(request_id)
        return [b.block_id for b in tables[0]] if tables else []

    def get_group_block_ids(self, request_id: str) -> tuple[list[int], ...]:
        tables = self.req_to_tables.get(request_id)
        if not tables or len(tables) == 1:
            return ()
        return tuple([b.block_id for b in table] for table in tables)

    def num_group_blocks(self, request_id: str) -> list[int]:
        """Real blocks the request holds in each group (what the window bounds for a local group)."""
        return [sum(1 for b in table if b is not self.null_block) for table in self.req_to_tables.get(request_id, [])]


def make_kv_cache_manager(groups: list[KVCacheGroupSpec], num_blocks: int, block_size: int,
                          enable_caching: bool) -> KVCacheManager:
    """The plain manager when every layer is global, the per-group one when some layer is local."""
    if all(g.sliding_window is None for g in groups):
        return KVCacheManager(num_blocks, block_size, enable_caching)
    return SlidingWindowKVCacheManager(num_blocks, block_size, enable_caching, groups)
