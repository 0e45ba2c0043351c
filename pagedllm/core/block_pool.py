"""The block pool: physical KV blocks, their reference counts, and the prefix-cache map.

Free blocks sit in an LRU queue. A free block may still hold a cached prefix (it has a
`block_hash`): it stays findable until the queue hands it out again, at which point its
hash is evicted. Freeing a request pushes its blocks tail-first, so the deepest blocks of a
prefix are evicted before the shallow ones that more requests are likely to share.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Optional


@dataclass(eq=False)
class KVCacheBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: Optional[tuple] = None


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        # block_id -> block, in LRU order (front = evicted first).
        self._free: OrderedDict[int, KVCacheBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self.cached_block_hash_to_block: dict[tuple, KVCacheBlock] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def is_cached(self, block: KVCacheBlock) -> bool:
        """Findable under its prefix hash (a duplicate of a prefix another block holds is not)."""
        return block.block_hash is not None and self.cached_block_hash_to_block.get(block.block_hash) is block

    def cached_free_block_ids(self) -> list[int]:
        """Free blocks still holding a findable prefix, in eviction order (for the engine-state snapshot)."""
        return [b.block_id for b in self._free.values() if self.is_cached(b)]

    def get_cached_block(self, block_hash: tuple) -> Optional[KVCacheBlock]:
        return self.cached_block_hash_to_block.get(block_hash)

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        """Take blocks from the LRU front, evicting whatever prefix they cached."""
        if num_blocks > len(self._free):
            raise ValueError(f"cannot get {num_blocks} blocks, only {len(self._free)} free")
        out = []
        for _ in range(num_blocks):
            _, block = self._free.popitem(last=False)
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def _evict(self, block: KVCacheBlock) -> None:
        if block.block_hash is not None:
            if self.cached_block_hash_to_block.get(block.block_hash) is block:
                del self.cached_block_hash_to_block[block.block_hash]
            block.block_hash = None

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Take a reference on cache-hit blocks, pulling free ones out of the LRU queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def free_blocks(self, ordered_blocks: Iterable[KVCacheBlock], evict_first: bool = False) -> None:
        """Drop one reference from each block; blocks reaching zero join the LRU tail in order (the front
        with `evict_first`: blocks holding nothing worth keeping)."""
        for block in ordered_blocks:
            if block.ref_cnt <= 0:
                raise RuntimeError(f"block {block.block_id} freed with ref_cnt {block.ref_cnt}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                if not self.enable_caching:
                    block.block_hash = None
                self._free[block.block_id] = block
                if evict_first:
                    self._free.move_to_end(block.block_id, last=False)

    def cache_block(self, block: KVCacheBlock, block_hash: tuple) -> None:
        """Register a full, about-to-be-computed block under its prefix hash."""
        if block.block_hash is not None:
            return
        block.block_hash = block_hash
        # If another block already holds this prefix (two requests computed it at once),
        # keep the first: both stay valid, only one needs to be findable.
        self.cached_block_hash_to_block.setdefault(block_hash, block)

    def uncache_block(self, block: KVCacheBlock) -> None:
        """Forget the prefix a block was registered under (its K/V turned out never to be written)."""
        self._evict(block)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix; only possible when no block is in use."""
        if len(self._free) != self.num_blocks:
            return False
        for block in self.blocks:
            block.block_hash = None
        self.cached_block_hash_to_block.clear()
        return True

    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks
