"""Writing this step's keys and values into the paged KV cache (vLLM's `reshape_and_cache_flash`).

Row t of the flattened batch goes to cache slot `slot_mapping[t] = block * block_size + offset`,
i.e. to `cache[block, offset]`, for both the key and the value cache, all KV heads at once.
A negative slot marks a padding row that owns no slot; it is skipped. An fp8 cache stores K / k_scale
and V / v_scale, saturated at the type's largest finite value (`attention/kv_quant.py`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.attention.kv_quant import is_fp8
from pagedllm.attention.ops.utils import check_last_dim_contiguous, padded


@triton.jit
def _reshape_and_cache_kernel(
    key_ptr,  # [num_tokens, num_kv_heads, head_dim]
    value_ptr,  # [num_tokens, num_kv_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping_ptr,  # [num_tokens]
    k_scale,
    v_scale,
    stride_key_token,
    stride_key_head,
    stride_value_token,
    stride_value_head,
    stride_kc_block,
    stride_kc_slot,
    stride_kc_head,
    stride_vc_block,
    stride_vc_slot,
    stride_vc_head,
    num_kv_heads,
    head_dim,
    BLOCK_SIZE: tl.constexpr,
    HEADS_PADDED: tl.constexpr,
    HEAD_DIM_PADDED: tl.constexpr,
    FP8_MAX: tl.constexpr,  # 0: the cache is not fp8
):
    """One program per token: copy its [num_kv_heads, head_dim] key and value tiles."""
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE

    heads = tl.arange(0, HEADS_PADDED)[:, None]
    dims = tl.arange(0, HEAD_DIM_PADDED)[None, :]
    mask = (heads < num_kv_heads) & (dims < head_dim)

    k = tl.load(key_ptr + token * stride_key_token + heads * stride_key_head + dims, mask=mask)
    v = tl.load(value_ptr + token * stride_value_token + heads * stride_value_head + dims, mask=mask)
    k_dst = k_cache_ptr + block * stride_kc_block + offset * stride_kc_slot + heads * stride_kc_head + dims
    v_dst = v_cache_ptr + block * stride_vc_block + offset * stride_vc_slot + heads * stride_vc_head + dims
    if FP8_MAX:
        k = tl.minimum(tl.maximum(k.to(tl.float32) / k_scale, -FP8_MAX), FP8_MAX)
        v = tl.minimum(tl.maximum(v.to(tl.float32) / v_scale, -FP8_MAX), FP8_MAX)
    # The cache may be narrower than the model's K/V (kv_cache_dtype): round once, here.
    tl.store(k_dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def reshape_and_cache(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens], int32 or int64
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Scatter `key`/`value` rows into their cache slots, in place, rounded to the cache's dtype
    when it is narrower (kv_cache_dtype)."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    if key.dtype != value.dtype or k_cache.dtype != v_cache.dtype:
        raise ValueError(f"key/value ({key.dtype}, {value.dtype}) and k/v caches ({k_cache.dtype}, "
                         f"{v_cache.dtype}) must each share a dtype")
    check_last_dim_contiguous(key, value, k_cache, v_cache)
    _reshape_and_cache_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        num_kv_heads, head_dim,
        BLOCK_SIZE=k_cache.shape[1],
        HEADS_PADDED=padded(num_kv_heads),
        HEAD_DIM_PADDED=padded(head_dim),
        FP8_MAX=torch.finfo(k_cache.dtype).max if is_fp8(k_cache.dtype) else 0.0,
    )
