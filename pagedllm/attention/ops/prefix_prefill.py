"""Causal attention for prefills that may start behind a cached prefix (vLLM's `prefix_prefill`).

A prefill sequence feeds `query_len` new tokens at positions `context_len .. seq_len - 1`,
where `context_len` tokens are already in the KV cache: 0 for a fresh prompt, the length of
a prefix-cache hit, or the tokens of earlier chunks under chunked prefill. Because the new
K/V are written into the cache before attention runs (`reshape_and_cache`), every key of the
sequence, cached or new, is read the same way: through the sequence's block table. Query i
sees keys `0 .. context_len + i`.

The kernel is FlashAttention-2's forward pass over a paged cache. One program owns a tile of
`BLOCK_M` query rows of one sequence and one head, and streams the visible keys in tiles of
`BLOCK_N`, keeping for every row an online softmax: the running maximum `m` of its scores,
the running sum `l` of `exp(score - m)`, and the running weighted sum `acc` of values. When a
new tile raises the maximum from `m` to `m'`, the old `l` and `acc` are rescaled by
`exp(m - m')`, so after the last tile `acc / l` is the exact softmax-weighted sum, without
ever materialising the [query_len, seq_len] score matrix. Scores are kept in base 2
(`exp2`, with `log2(e)` folded into the scale), which is what the hardware computes natively.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.attention.ops.utils import (
    check_last_dim_contiguous,
    compute_in_fp32,
    dot,
    padded,
    soft_capped_log2_scores,
)

LOG2E = 1.4426950408889634


@triton.jit
def _prefix_prefill_kernel(
    out_ptr,  # [num_tokens, num_heads, head_dim]
    query_ptr,  # [num_tokens, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,
    block_tables_ptr,  # [num_seqs, max_blocks], one row per prefill sequence
    query_start_loc_ptr,  # [num_seqs + 1]: sequence s owns batch rows start[s] .. start[s + 1] - 1
    seq_lens_ptr,  # [num_seqs]: context_len + query_len
    qk_scale,  # softmax scale * log2(e)
    scale,  # the softmax scale itself (soft-capping applies before the base change)
    soft_cap,  # SOFT_CAP: scores become soft_cap * tanh(score / soft_cap)
    v_scale,  # an fp8 cache holds V / v_scale (and K / k_scale, folded into the scales above)
    sliding_window,  # SLIDING: query at p sees keys p - sliding_window < j <= p
    stride_q_token,
    stride_q_head,
    stride_o_token,
    stride_o_head,
    stride_kc_block,
    stride_kc_slot,
    stride_kc_head,
    stride_vc_block,
    stride_vc_slot,
    stride_vc_head,
    stride_bt_seq,
    head_dim,
    QUERIES_PER_KV: tl.constexpr,  # num_heads // num_kv_heads (GQA group size)
    BLOCK_SIZE: tl.constexpr,  # KV-cache block size
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # keys per inner-loop tile
    HEAD_DIM_PADDED: tl.constexpr,
    COMPUTE_IN_FP32: tl.constexpr,
    SOFT_CAP: tl.constexpr,
    SLIDING: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    m_tile = tl.program_id(2)
    kv_head = head // QUERIES_PER_KV

    q_start = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if m_tile * BLOCK_M >= query_len:
        return  # the grid is sized for the longest prefill; shorter ones end early
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - query_len

    rows = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)  # query index within the sequence
    row_mask = rows < query_len
    q_pos = context_len + rows  # absolute position of each query token
    dims = tl.arange(0, HEAD_DIM_PADDED)
    dim_mask = dims < head_dim

    q = tl.load(
        query_ptr + (q_start + rows)[:, None] * stride_q_token + head * stride_q_head + dims[None, :],
        mask=row_mask[:, None] & dim_mask[None, :],
        other=0.0,
    )
    if COMPUTE_IN_FP32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PADDED], dtype=tl.float32)

    # The last row of this tile sees keys up to its own position; nothing later is read.
    kv_end = tl.minimum(seq_len, context_len + (m_tile + 1) * BLOCK_M)
    block_table = block_tables_ptr + seq.to(tl.int64) * stride_bt_seq
    first_key = 0
    if SLIDING:  # the first key any row of this tile sees: blocks before it may be freed, never read
        first_key = tl.maximum(context_len + m_tile * BLOCK_M - sliding_window + 1, 0)
    for kv_start in range((first_key // BLOCK_N) * BLOCK_N, kv_end, BLOCK_N):
        k_pos = kv_start + tl.arange(0, BLOCK_N)
        k_mask = (k_pos < kv_end) & (k_pos >= first_key)
        # Paged gather: each key position finds its physical block through the block table.
        block = tl.load(block_table + k_pos // BLOCK_SIZE, mask=k_mask, other=0).to(tl.int64)
        in_block = k_pos % BLOCK_SIZE
        # K is loaded transposed, [head_dim, BLOCK_N], ready for q @ k.
        k = tl.load(
            k_cache_ptr + block[None, :] * stride_kc_block + in_block[None, :] * stride_kc_slot
            + kv_head * stride_kc_head + dims[:, None],
            mask=dim_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        v = tl.load(
            v_cache_ptr + block[:, None] * stride_vc_block + in_block[:, None] * stride_vc_slot
            + kv_head * stride_vc_head + dims[None, :],
            mask=k_mask[:, None] & dim_mask[None, :],
            other=0.0,
        )
        if COMPUTE_IN_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)

        if SOFT_CAP:
            scores = soft_capped_log2_scores(dot(q, k), scale, soft_cap)
        else:
            scores = dot(q, k) * qk_scale  # [BLOCK_M, BLOCK_N], base-2 logits
        visible = (k_pos[None, :] <= q_pos[:, None]) & k_mask[None, :]
        if SLIDING:
            visible = visible & (k_pos[None, :] > q_pos[:, None] - sliding_window)
        scores = tl.where(visible, scores, float("-inf"))

        # Online softmax. Every row sees key 0 in the first tile, so m_new is finite from then on.
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        if SLIDING:  # a later row may see nothing yet in its first tiles: keep its -inf maximum harmless
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_new)  # rescales what was accumulated under the old maximum
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v)
        m_i = m_new

    if SLIDING:  # padding rows past the query may see no key at all: 0 / 0, never stored
        l_i = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc * v_scale / l_i[:, None]
    tl.store(
        out_ptr + (q_start + rows)[:, None] * stride_o_token + head * stride_o_head + dims[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_mask[:, None] & dim_mask[None, :],
    )


def prefix_prefill(
    out: torch.Tensor,  # [num_tokens, num_heads, head_dim], written at the prefill rows
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], already holding this step's K
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32, one row per prefill sequence
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32, rows into query/out
    seq_lens: torch.Tensor,  # [num_seqs] int32
    max_query_len: int,
    scale: float,
    block_m: int | None = None,
    block_n: int | None = None,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Attention for every prefill sequence; `block_m`/`block_n` override the tile sizes (tests).
    A local layer (`sliding_window`) reads only its window's blocks; `soft_cap` caps the scores.
    An fp8 cache holds K / k_scale and V / v_scale."""
    num_seqs = seq_lens.shape[0]
    if num_seqs == 0 or max_query_len == 0:
        return
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = k_cache.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    check_last_dim_contiguous(out, query, k_cache, v_cache)
    fp32 = query.dtype == torch.float32 or k_cache.dtype != query.dtype
    # Tiles of 64 x 64 keep a head_dim-128 fp16/bf16 working set in registers and shared memory;
    # fp32 tiles are twice the bytes, so half as many keys per step.
    block_m = block_m or 64
    block_n = block_n or (32 if fp32 else 64)
    grid = (num_seqs, num_heads, triton.cdiv(max_query_len, block_m))
    _prefix_prefill_kernel[grid](
        out, query, k_cache, v_cache, block_tables, query_start_loc, seq_lens,
        scale * k_scale * LOG2E, scale * k_scale, soft_cap or 1.0, v_scale, sliding_window or 0,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        head_dim,
        QUERIES_PER_KV=num_heads // num_kv_heads,
        BLOCK_SIZE=k_cache.shape[1],
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        HEAD_DIM_PADDED=padded(head_dim, 16),
        COMPUTE_IN_FP32=compute_in_fp32(query.dtype, k_cache.dtype),
        SOFT_CAP=soft_cap is not None,
        SLIDING=sliding_window is not None,
        num_warps=4,
    )
