"""Storing K/V in fp8 (`kv_cache_dtype="fp8"`, `"fp8_e4m3"`, `"fp8_e5m2"`, vLLM's names).

An 8-bit float has little range (e4m3: +-448, e5m2: +-57344) and few mantissa bits, so, as in
vLLM, each attention layer has a per-tensor scale for K and one for V: the cache holds
`x / scale`, rounded to the nearest fp8 value (saturated at the type's largest finite value, so
that an outlier is clipped rather than becoming NaN, which e4m3 has in place of infinity), and a
read gives `stored * scale`. Scales default to 1.0 (vLLM's default when a checkpoint carries none:
typical K/V magnitudes sit well inside e4m3's range) and are read from checkpoints that carry
them (`self_attn.k_scale` / `v_scale`, or compressed-tensors' `k_proj.output_scale` /
`v_proj.output_scale`).

The wider cache dtypes (the model's own, bfloat16) go through the same functions with no scale,
so every attention path calls `to_cache` / `from_cache` whatever the cache holds.
"""

from __future__ import annotations

import torch

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPES


def effective_scales(cache_dtype: torch.dtype, k_scale: float, v_scale: float) -> tuple[float, float]:
    """The scales a kernel applies: the layer's for an fp8 cache, none for a wider one (a checkpoint's
    k_scale/v_scale are loaded whatever kv_cache_dtype is, and mean nothing to a float cache)."""
    return (k_scale, v_scale) if is_fp8(cache_dtype) else (1.0, 1.0)


def to_cache(x: torch.Tensor, cache_dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """`x` as the cache stores it: divided by `scale`, saturated and rounded for fp8; else just cast."""
    if not is_fp8(cache_dtype):
        return x.to(cache_dtype)
    limit = torch.finfo(cache_dtype).max
    x = x.float() if scale == 1.0 else x.float() / scale
    return x.clamp(-limit, limit).to(cache_dtype)


def from_cache(stored: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """Cached K or V back in the compute dtype (times the layer's scale for fp8)."""
    out = stored.to(dtype)
    if is_fp8(stored.dtype) and scale != 1.0:
        out = out * scale
    return out


def byte_view(cache: torch.Tensor) -> torch.Tensor:
    """The cache as something `index_copy_` can write into: PyTorch's CPU scatter kernels have no
    fp8 variant, so an fp8 cache is written through its bytes (same storage)."""
    return cache.view(torch.uint8) if is_fp8(cache.dtype) else cache


def write_scaled(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Scatter this step's K/V [num_tokens, num_kv_heads, head_dim] into their cache slots."""
    for x, cache, scale in ((key, k_cache, k_scale), (value, v_cache, v_scale)):
        stored = to_cache(x, cache.dtype, scale)
        byte_view(cache).view(-1, *cache.shape[2:]).index_copy_(0, slot_mapping, byte_view(stored))
