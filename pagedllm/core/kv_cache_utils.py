"""How many KV-cache blocks the engine gets: arithmetic on the config and the workers' budget.

The engine core asks every worker how many bytes it can give the cache (`determine_available_memory`:
on CPU the configured budget, on GPU what a profiling pass leaves under `gpu_memory_utilization`),
turns the smallest answer into a block count here, and tells every worker to allocate that many
(vLLM's `determine_available_memory` / `get_kv_cache_config` / `initialize_kv_cache`). The scheduler's
block pool has the same count: every worker holds the same blocks, each with its own KV heads.
"""

from __future__ import annotations

import torch

from pagedllm.config import EngineConfig, ModelConfig, ParallelConfig
from pagedllm.distributed.parallel_state import get_pp_indices
from pagedllm.logger import init_logger
from pagedllm.model_executor.kv_cache_groups import kv_cache_groups_for, max_blocks_per_request, num_cache_tensors

logger = init_logger(__name__)


def bytes_per_block(model_config: ModelConfig, block_size: int, tp_size: int = 1,
                    dtype: torch.dtype | None = None, num_layers: int | None = None) -> int:
    """One block's K and V over the layers one worker caches, on one worker: every layer of a KV-cache
    group (all layers, unless the model has local ones: `model_executor/kv_cache_groups.py`), or
    `num_layers` (a pipeline stage's); `dtype`: the cache's (default: the model's)."""
    elem = torch.empty((), dtype=dtype or model_config.dtype).element_size()
    num_kv_heads = model_config.num_kv_heads // tp_size
    if num_layers is None:
        num_layers = num_cache_tensors(kv_cache_groups_for(model_config.text_config))
    return 2 * num_layers * block_size * num_kv_heads * model_config.head_dim * elem


def max_stage_layers(num_layers: int, parallel_config: ParallelConfig) -> int:
    """The most layers any pipeline stage holds (all of them without pipeline parallelism)."""
    pp = parallel_config.pipeline_parallel_size
    return max(end - start for start, end in
               (get_pp_indices(num_layers, rank, pp, parallel_config.pp_layer_partition) for rank in range(pp)))


def num_blocks_for_budget(config: EngineConfig, available_bytes: int) -> int:
    """The blocks `available_bytes` per worker hold (one kept back for the CUDA-graph padding block),
    never more than all `max_num_seqs` requests at `max_model_len` could use: extra blocks would
    only cost memory. `num_gpu_blocks_override` wins over everything."""
    cc, mc, sc = config.cache_config, config.model_config, config.scheduler_config
    if cc.num_gpu_blocks_override is not None:
        return cc.num_gpu_blocks_override
    pc = config.parallel_config
    # Under pipeline parallelism a worker holds its stage's layers; the largest stage bounds the count.
    per_block = bytes_per_block(mc, cc.block_size, pc.tensor_parallel_size, config.kv_cache_dtype,
                                max_stage_layers(mc.num_layers, pc) if pc.pipeline_parallel_size > 1 else None)
    spec = config.speculative_config
    if spec is not None and spec.draft_model_config is not None:  # the draft's own K/V, under the same block ids
        per_block += bytes_per_block(spec.draft_model_config, cc.block_size, pc.tensor_parallel_size,
                                     config.kv_cache_dtype)
    num_blocks = max(0, available_bytes) // per_block - 1  # the model runner adds the padding block
    useful = sc.max_num_seqs * max_blocks_per_request(kv_cache_groups_for(mc.text_config), mc.max_model_len,
                                                      cc.block_size, sc.max_num_batched_tokens)
    if num_blocks > useful:
        logger.debug("KV cache capped at %d blocks: all requests at max_model_len fit", useful)
        num_blocks = useful
    if num_blocks < 1:
        raise ValueError(
            f"the KV-cache budget ({available_bytes} bytes) does not fit a single block of {per_block} bytes; "
            "raise kv_cache_memory_bytes / PAGEDLLM_CPU_KVCACHE_SPACE or gpu_memory_utilization"
        )
    return num_blocks
