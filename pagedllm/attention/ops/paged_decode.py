"""Decode attention over a paged KV cache, split along the sequence when the batch is small.

Each decoding sequence has one new query token that attends to all `seq_len` keys of its
sequence, found through its block table. Work is laid out per (sequence, KV head): one
program loads each K/V tile once and scores it against all the query heads that share that KV
head (the GQA group, padded to 16 rows so `tl.dot` can use the tensor cores).

A small batch gives too few (sequence, KV head) pairs to occupy every SM while each streams
a long context, so the context is also cut into `num_splits` contiguous ranges handled by
separate programs (PagedAttention v2, flash-decoding). Each split runs the usual online
softmax over its own range and leaves a partial result: its maximum score `m_s`, its sum
`l_s = sum exp(score - m_s)` and its unnormalised output `o_s = sum exp(score - m_s) * v`.
A second kernel combines them exactly: with `M = max_s m_s`,

    out = sum_s exp(m_s - M) * o_s / sum_s exp(m_s - M) * l_s.

With a single split the first kernel normalises and writes the output itself, and the
reduction is skipped. Scores are in base 2 (`exp2`, `log2(e)` folded into the scale).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.attention.ops.utils import (
    check_last_dim_contiguous,
    compute_in_fp32,
    dot,
    num_compute_units,
    padded,
    soft_capped_log2_scores,
)

LOG2E = 1.4426950408889634
# A split shorter than this spends more on its partial result than it saves.
MIN_KEYS_PER_SPLIT = 256
MAX_SPLITS = 16


@triton.jit
def _paged_decode_kernel(
    out_ptr,  # [num_seqs, num_heads, head_dim]: the result, when there is one split
    partial_out_ptr,  # [num_seqs, num_heads, num_splits, HEAD_DIM_PADDED] fp32, when there are more
    partial_max_ptr,  # [num_seqs, num_heads, num_splits] fp32
    partial_sum_ptr,  # [num_seqs, num_heads, num_splits] fp32
    query_ptr,  # [num_seqs, num_heads, head_dim]: one query token per sequence
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,
    block_tables_ptr,  # [num_seqs, max_blocks]
    seq_lens_ptr,  # [num_seqs]
    qk_scale,  # softmax scale * log2(e)
    scale,  # the softmax scale itself (soft-capping applies before the base change)
    soft_cap,  # SOFT_CAP: scores become soft_cap * tanh(score / soft_cap)
    v_scale,  # an fp8 cache holds V / v_scale (and K / k_scale, folded into the scales above)
    sliding_window,  # SLIDING: the query sees only its last sliding_window keys (itself included)
    num_heads,
    num_splits,
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
    QUERIES_PER_KV: tl.constexpr,
    GROUP_PADDED: tl.constexpr,  # QUERIES_PER_KV rounded up to a power of two, at least 16
    BLOCK_SIZE: tl.constexpr,
    TILE_N: tl.constexpr,  # keys per inner-loop tile
    HEAD_DIM_PADDED: tl.constexpr,
    SPLIT: tl.constexpr,  # num_splits > 1: write partial results for the reduction
    COMPUTE_IN_FP32: tl.constexpr,
    SOFT_CAP: tl.constexpr,
    SLIDING: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)

    # This split's keys: a contiguous run of whole tiles. Late splits of a short sequence may
    # get none; they still record an empty partial result (m = -inf, l = 0) for the reduction.
    # A local layer starts at the tile of its window's first key (blocks before it may be freed);
    # every tile from there on still holds a visible key.
    num_tiles = tl.cdiv(seq_len, TILE_N)
    first_key = 0
    if SLIDING:
        first_key = tl.maximum(seq_len - sliding_window, 0)
    first_tile = first_key // TILE_N
    tiles_per_split = tl.cdiv(num_tiles - first_tile, num_splits)
    tile_lo = first_tile + split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)

    group = tl.arange(0, GROUP_PADDED)
    heads = kv_head * QUERIES_PER_KV + group  # the query heads reading this KV head
    head_mask = group < QUERIES_PER_KV
    dims = tl.arange(0, HEAD_DIM_PADDED)
    dim_mask = dims < head_dim

    q = tl.load(
        query_ptr + seq * stride_q_token + heads[:, None] * stride_q_head + dims[None, :],
        mask=head_mask[:, None] & dim_mask[None, :],
        other=0.0,
    )
    if COMPUTE_IN_FP32:
        q = q.to(tl.float32)

    m_i = tl.full([GROUP_PADDED], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PADDED], dtype=tl.float32)
    acc = tl.zeros([GROUP_PADDED, HEAD_DIM_PADDED], dtype=tl.float32)

    block_table = block_tables_ptr + seq.to(tl.int64) * stride_bt_seq
    for tile in range(tile_lo, tile_hi):
        k_pos = tile * TILE_N + tl.arange(0, TILE_N)
        k_mask = (k_pos < seq_len) & (k_pos >= first_key)
        block = tl.load(block_table + k_pos // BLOCK_SIZE, mask=k_mask, other=0).to(tl.int64)
        in_block = k_pos % BLOCK_SIZE
        k = tl.load(  # [head_dim, TILE_N]
            k_cache_ptr + block[None, :] * stride_kc_block + in_block[None, :] * stride_kc_slot
            + kv_head * stride_kc_head + dims[:, None],
            mask=dim_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        v = tl.load(  # [TILE_N, head_dim]
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
            scores = dot(q, k) * qk_scale  # [GROUP_PADDED, TILE_N]
        scores = tl.where(k_mask[None, :], scores, float("-inf"))
        # Online softmax; each tile holds at least one key, so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v)
        m_i = m_new

    acc = acc * v_scale
    if SPLIT:
        # Partial results, indexed [seq, head, split]; the reduction normalises.
        stat_offs = (seq * num_heads + heads) * num_splits + split
        tl.store(partial_max_ptr + stat_offs, m_i, mask=head_mask)
        tl.store(partial_sum_ptr + stat_offs, l_i, mask=head_mask)
        tl.store(
            partial_out_ptr + stat_offs[:, None] * HEAD_DIM_PADDED + dims[None, :],
            acc,
            mask=head_mask[:, None],
        )
    else:
        out = acc / l_i[:, None]
        tl.store(
            out_ptr + seq * stride_o_token + heads[:, None] * stride_o_head + dims[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=head_mask[:, None] & dim_mask[None, :],
        )


@triton.jit
def _reduce_splits_kernel(
    out_ptr,  # [num_seqs, num_heads, head_dim]
    partial_out_ptr,  # [num_seqs, num_heads, num_splits, HEAD_DIM_PADDED]
    partial_max_ptr,  # [num_seqs, num_heads, num_splits]
    partial_sum_ptr,
    num_heads,
    num_splits,
    stride_o_token,
    stride_o_head,
    head_dim,
    SPLITS_PADDED: tl.constexpr,
    HEAD_DIM_PADDED: tl.constexpr,
):
    """One program per (sequence, query head): merge the splits' partial softmax results."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS_PADDED)
    split_mask = splits < num_splits
    dims = tl.arange(0, HEAD_DIM_PADDED)

    stat_offs = (seq * num_heads + head) * num_splits + splits
    m = tl.load(partial_max_ptr + stat_offs, mask=split_mask, other=float("-inf"))
    l = tl.load(partial_sum_ptr + stat_offs, mask=split_mask, other=0.0)
    o = tl.load(partial_out_ptr + stat_offs[:, None] * HEAD_DIM_PADDED + dims[None, :],
                mask=split_mask[:, None], other=0.0)

    # Split 0 always holds keys, so the global maximum is finite; empty splits weigh exp2(-inf) = 0.
    weight = tl.exp2(m - tl.max(m, axis=0))
    out = tl.sum(o * weight[:, None], axis=0) / tl.sum(l * weight, axis=0)
    tl.store(
        out_ptr + seq * stride_o_token + head * stride_o_head + dims,
        out.to(out_ptr.dtype.element_ty),
        mask=dims < head_dim,
    )


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, device: torch.device) -> int:
    """How many programs should share one sequence's keys.

    Enough (sequence, KV head, split) programs to give every SM about two, but no split shorter
    than MIN_KEYS_PER_SPLIT keys: large batches and short contexts run unsplit.
    """
    programs = num_seqs * num_kv_heads
    wanted = triton.cdiv(2 * num_compute_units(device), programs)
    useful = triton.cdiv(max_seq_len, MIN_KEYS_PER_SPLIT)
    return max(1, min(wanted, useful, MAX_SPLITS))


def paged_decode(
    out: torch.Tensor,  # [num_seqs, num_heads, head_dim]
    query: torch.Tensor,  # [num_seqs, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], already holding this step's K
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32, including the new token
    max_seq_len: int,  # an upper bound on seq_lens, to size the splits
    scale: float,
    num_splits: int | None = None,
    tile_n: int | None = None,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Decode attention for sequences with one query token each; `num_splits`/`tile_n` override
    the heuristics (tests). A local layer (`sliding_window`) reads only its window's blocks;
    `soft_cap` caps the scores (Gemma 2). An fp8 cache holds K / k_scale and V / v_scale."""
    num_seqs, num_heads, head_dim = query.shape
    if num_seqs == 0:
        return
    num_kv_heads = k_cache.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    check_last_dim_contiguous(out, query, k_cache, v_cache)
    if num_splits is None:
        keys = max_seq_len if sliding_window is None else min(max_seq_len, sliding_window)
        num_splits = choose_num_splits(num_seqs, num_kv_heads, keys, query.device)
    tile_n = tile_n or 64
    head_dim_padded = padded(head_dim, 16)
    queries_per_kv = num_heads // num_kv_heads

    if num_splits > 1:
        partial_out = torch.empty(num_seqs, num_heads, num_splits, head_dim_padded, dtype=torch.float32,
                                  device=query.device)
        partial_max = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=query.device)
        partial_sum = torch.empty_like(partial_max)
    else:  # unused by the kernel; any tensor will do as the pointer
        partial_out = partial_max = partial_sum = out

    _paged_decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        out, partial_out, partial_max, partial_sum,
        query, k_cache, v_cache, block_tables, seq_lens,
        scale * k_scale * LOG2E,
        scale * k_scale,
        soft_cap or 1.0,
        v_scale,
        sliding_window or 0,
        num_heads,
        num_splits,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        head_dim,
        QUERIES_PER_KV=queries_per_kv,
        GROUP_PADDED=padded(queries_per_kv, 16),
        BLOCK_SIZE=k_cache.shape[1],
        TILE_N=tile_n,
        HEAD_DIM_PADDED=head_dim_padded,
        SPLIT=num_splits > 1,
        COMPUTE_IN_FP32=compute_in_fp32(query.dtype, k_cache.dtype),
        SOFT_CAP=soft_cap is not None,
        SLIDING=sliding_window is not None,
        num_warps=4,
    )
    if num_splits > 1:
        _reduce_splits_kernel[(num_seqs, num_heads)](
            out, partial_out, partial_max, partial_sum,
            num_heads,
            num_splits,
            out.stride(0), out.stride(1),
            head_dim,
            SPLITS_PADDED=padded(num_splits),
            HEAD_DIM_PADDED=head_dim_padded,
        )
