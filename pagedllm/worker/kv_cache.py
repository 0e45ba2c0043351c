"""Allocating the paged KV cache: one (key, value) pair of tensors per layer.

Each tensor is [num_blocks, block_size, num_kv_heads, head_dim]; under tensor parallelism a worker
holds only its `num_kv_heads / tp_size` heads. How many blocks there are is the engine core's
decision (`core/kv_cache_utils.py`), made from what the workers report they can hold
(`Worker.determine_available_memory`); this module only lays them out.
"""

from __future__ import annotations

import mmap

import torch

from pagedllm.config import ModelConfig
from pagedllm.model_executor.kv_cache_groups import kv_cache_groups_for, layer_to_tensor, num_cache_tensors

KVCaches = list[tuple[torch.Tensor, torch.Tensor]]


def allocate_kv_cache(
    model_config: ModelConfig, num_blocks: int, block_size: int, device: torch.device, tp_size: int = 1,
    dtype: torch.dtype | None = None, stage_layers: int | None = None,
) -> KVCaches:
    """Zero-filled, so that slots a masked attention row still reads hold finite values.

    On CPU the zeros come from one anonymous memory map: the OS hands out zero pages lazily, so
    start-up does not spend seconds writing gigabytes of zeros, and memory is only committed as
    blocks are actually used. Not NumPy's calloc: NumPy advises huge pages for large buffers, and
    where the kernel's THP defrag setting is `madvise` every first touch then waits for memory
    compaction, which made writing a fresh block's K/V ~25x slower (W1's prefill spent 1.3 s of
    its 3 s in `index_copy_` in bfloat16).
    """
    dtype = dtype or model_config.dtype
    num_kv_heads = model_config.num_kv_heads // tp_size
    shape = (num_blocks, block_size, num_kv_heads, model_config.head_dim)
    if stage_layers is None:
        # One pair per layer, unless local and global layers keep separate block tables: then one pair per
        # layer of a KV-cache group, shared by the groups (`model_executor/kv_cache_groups.py`).
        groups = kv_cache_groups_for(model_config.text_config)
        num_pairs = num_cache_tensors(groups)
        pair_of = [tensor for _, (_, tensor) in sorted(layer_to_tensor(groups).items())]
    else:  # a pipeline stage: one pair for each of its layers (one group: refused otherwise)
        num_pairs, pair_of = stage_layers, list(range(stage_layers))
    num_tensors = 2 * num_pairs
    if device.type == "cpu":
        elem = torch.empty((), dtype=dtype).element_size()
        numel = num_tensors * num_blocks * block_size * num_kv_heads * model_config.head_dim
        flat = torch.frombuffer(mmap.mmap(-1, numel * elem), dtype=torch.uint8).view(dtype)
        tensors = list(flat.view(num_tensors, *shape).unbind(0))
    else:
        tensors = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_tensors)]
    return [(tensors[2 * t], tensors[2 * t + 1]) for t in pair_of]
