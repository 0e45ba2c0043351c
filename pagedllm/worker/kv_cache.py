"""Sizing and allocating the paged KV cache.

One (key, value) pair of tensors per layer, each [num_blocks, block_size, num_kv_heads,
head_dim]; under tensor parallelism a worker holds only its `num_kv_heads / tp_size` heads.
The number of blocks comes from, in order: `num_gpu_blocks_override` (exact, on any device);
on CPU the byte budget (`kv_cache_memory_bytes`, else `$PAGEDLLM_CPU_KVCACHE_SPACE` GiB,
default 4); on GPU `kv_cache_memory_bytes`, else what
`gpu_memory_utilization` of the device leaves after the weights, the peak activations of a
profiling pass and the CUDA-graph pool (`memory_profiler.py`). Never more than all
`max_num_seqs` requests at `max_model_len` could use, since extra blocks would only cost memory.
"""

from __future__ import annotations

import mmap
from typing import TYPE_CHECKING

import torch

from pagedllm.config import CacheConfig, ModelConfig, SchedulerConfig
from pagedllm.core.kv_cache_manager import cdiv
from pagedllm.logger import init_logger

if TYPE_CHECKING:
    from pagedllm.worker.memory_profiler import MemoryProfile

logger = init_logger(__name__)


def bytes_per_block(model_config: ModelConfig, block_size: int, tp_size: int = 1,
                    dtype: torch.dtype | None = None) -> int:
    """`dtype`: the cache's storage dtype (default: the model's)."""
    elem = torch.empty((), dtype=dtype or model_config.dtype).element_size()
    num_kv_heads = model_config.num_kv_heads // tp_size
    return 2 * model_config.num_layers * block_size * num_kv_heads * model_config.head_dim * elem


def determine_num_blocks(
    model_config: ModelConfig,
    cache_config: CacheConfig,
    scheduler_config: SchedulerConfig,
    device: torch.device,
    tp_size: int = 1,
    *,
    profile: MemoryProfile | None = None,
) -> int:
    """`profile` (a CUDA memory profile) is needed on GPU unless a block count or byte budget is given."""
    per_block = bytes_per_block(model_config, cache_config.block_size, tp_size,
                                cache_config.kv_cache_torch_dtype(model_config.dtype))
    if cache_config.num_gpu_blocks_override is not None:
        return cache_config.num_gpu_blocks_override
    if device.type == "cpu":
        budget = cache_config.cpu_kv_cache_bytes()
    elif cache_config.kv_cache_memory_bytes is not None:
        budget = cache_config.kv_cache_memory_bytes
    else:
        from pagedllm.worker.memory_profiler import kv_cache_budget

        if profile is None:
            raise ValueError("sizing the KV cache on GPU needs a memory profile (worker/memory_profiler.py)")
        budget = kv_cache_budget(profile, cache_config.gpu_memory_utilization)
    num_blocks = max(0, budget) // per_block - 1  # the model runner adds the padding block
    useful = scheduler_config.max_num_seqs * cdiv(model_config.max_model_len, cache_config.block_size)
    if num_blocks > useful:
        logger.debug("KV cache capped at %d blocks: all requests at max_model_len fit", useful)
        num_blocks = useful
    if num_blocks < 1:
        raise ValueError(
            f"the KV-cache budget ({budget} bytes) does not fit a single block of {per_block} bytes; "
            "raise kv_cache_memory_bytes / PAGEDLLM_CPU_KVCACHE_SPACE or gpu_memory_utilization"
        )
    return num_blocks


def allocate_kv_cache(
    model_config: ModelConfig, num_blocks: int, block_size: int, device: torch.device, tp_size: int = 1,
    dtype: torch.dtype | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
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
    num_tensors = 2 * model_config.num_layers
    if device.type == "cpu":
        elem = torch.empty((), dtype=dtype).element_size()
        numel = num_tensors * num_blocks * block_size * num_kv_heads * model_config.head_dim
        flat = torch.frombuffer(mmap.mmap(-1, numel * elem), dtype=torch.uint8).view(dtype)
        tensors = list(flat.view(num_tensors, *shape).unbind(0))
    else:
        tensors = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_tensors)]
    return [(tensors[2 * i], tensors[2 * i + 1]) for i in range(model_config.num_layers)]
