"""KV-cache groups: which layers share a block table, and what a block of the pool holds.

A model whose layers all attend globally has one group, one block table per request, and one cache
tensor (K and V) per layer, as always. A model with local (sliding-window) layers needs less: a local
layer only reads its last `sliding_window` keys, so its blocks that leave the window can be given
back. Local and global layers then need block tables of their own (vLLM's hybrid KV-cache manager):
layers are put in groups of one attention type and equal size `g` (the gcd of the types' layer
counts), each group with its own block table, and the cache holds `g` tensors per K and V. A block of
the pool is one slot in each of the `g` tensors; a block given to group i holds the K/V of group i's
layers, layer j of a group living in tensor j. Gemma 3's 5:1 pattern over 26 layers (22 local, 4
global) makes 13 groups of 2 layers: a block costs 2 layers of memory, and a request's long context
grows only the 2 global groups.

Pure Python, read by both sides: the scheduler's KV-cache manager keeps one table per group, the
runner writes and reads each layer's K/V through its group's table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pagedllm.model_executor.models.layer_types import layer_sliding_windows
from pagedllm.utils import cdiv


@dataclass(frozen=True)
class KVCacheGroupSpec:
    layer_ids: tuple[int, ...]  # in model order; layer_ids[j] lives in cache tensor j
    sliding_window: int | None  # None: global attention


def kv_cache_groups(windows: list[int | None]) -> list[KVCacheGroupSpec]:
    """Group layers by their window (None = global) into groups of equal size."""
    if len(set(windows)) <= 1:
        return [KVCacheGroupSpec(tuple(range(len(windows))), windows[0] if windows else None)]
    by_window: dict[int | None, list[int]] = {}
    for layer, window in enumerate(windows):
        by_window.setdefault(window, []).append(layer)
    size = math.gcd(*(len(layers) for layers in by_window.values()))
    groups = [KVCacheGroupSpec(tuple(layers[i : i + size]), window)
              for window, layers in by_window.items() for i in range(0, len(layers), size)]
    return sorted(groups, key=lambda g: g.layer_ids[0])


def kv_cache_groups_for(hf_config) -> list[KVCacheGroupSpec]:
    return kv_cache_groups(layer_sliding_windows(hf_config))


def num_cache_tensors(groups: list[KVCacheGroupSpec]) -> int:
    """Cache tensors per K and per V: a block holds this many layers' K/V."""
    return len(groups[0].layer_ids)


def layer_to_tensor(groups: list[KVCacheGroupSpec]) -> dict[int, tuple[int, int]]:
    """layer -> (its group, the cache tensor it uses)."""
    return {layer: (g, j) for g, group in enumerate(groups) for j, layer in enumerate(group.layer_ids)}


def blocks_for_tokens(window: int | None, num_tokens: int, block_size: int, chunk_tokens: int = 1) -> int:
    """The most blocks one group holds for a sequence of `num_tokens` fed at most `chunk_tokens` a step:
    all of them for a global group; for a local group, those spanned by the chunk and the `window - 1`
    keys before it (blocks that left the window go back before the next step's allocation)."""
    if window is None:
        return cdiv(num_tokens, block_size)
    return min(cdiv(num_tokens, block_size), cdiv(window - 2 + chunk_tokens, block_size) + 1)


def max_blocks_per_request(groups: list[KVCacheGroupSpec], max_model_len: int, block_size: int,
                           chunk_tokens: int = 1) -> int:
    """The blocks one request of up to `max_model_len` tokens holds at most, over all groups."""
    return sum(blocks_for_tokens(g.sliding_window, max_model_len, block_size, chunk_tokens) for g in groups)
