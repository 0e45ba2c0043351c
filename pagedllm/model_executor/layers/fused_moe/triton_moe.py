"""The GPU fused-MoE: one Triton launch per GEMM for all experts at once.

The (token, slot) pairs are sorted by expert and each expert's run is padded to a whole number of
`BLOCK_M` rows (`moe_align_block_size`, vLLM's name); every row block then belongs to one expert, so
a program multiplies its block of gathered rows by that expert's weight tile. The first launch
computes gate/up for every pair (rows of the input read through `pair // top_k`, no gathered copy);
the activation runs between the launches; the second launch computes down and multiplies each row
by its routing weight; the `top_k` rows of a token are then summed. All of it is device-side: no
host synchronisation, so it can be captured in a CUDA graph.

Tested on CPU under `TRITON_INTERPRET=1` against `reference.py` (tests/test_fused_moe.py).
"""

from __future__ import annotations

from typing import Callable

import torch
import triton
import triton.language as tl
from torch import nn

from pagedllm.model_executor.layers.fused_moe.method import FusedMoEMethodBase


@triton.jit
def fused_moe_kernel(
    a_ptr, b_ptr, c_ptr, topk_weights_ptr, sorted_pair_ids_ptr, block_expert_ids_ptr,
    N, K, num_pairs,
    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn,
    PAIRS_PER_A_ROW: tl.constexpr,  # top_k when A holds one row per token, 1 when one per pair
    MUL_ROUTED_WEIGHT: tl.constexpr,
    IEEE_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """C[pair, n] = (w[pair] *) sum_k A[row(pair), k] * B[expert, n, k] for one block of pairs."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ids_ptr + pid_m).to(tl.int64)
    if expert < 0:  # a block past the last expert's padded run
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair_ids = tl.load(sorted_pair_ids_ptr + offs_m).to(tl.int64)
    row_mask = pair_ids < num_pairs
    a_rows = pair_ids // PAIRS_PER_A_ROW
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        a = tl.load(a_ptr + a_rows[:, None] * stride_am + k[None, :] * stride_ak,
                    mask=row_mask[:, None] & (k[None, :] < K), other=0.0)
        b = tl.load(b_ptr + expert * stride_be + offs_n[None, :] * stride_bn + k[:, None] * stride_bk,
                    mask=(offs_n[None, :] < N) & (k[:, None] < K), other=0.0)
        if IEEE_FP32:
            acc += tl.dot(a, b, input_precision="ieee")
        else:
            acc += tl.dot(a, b)
    if MUL_ROUTED_WEIGHT:
        weight = tl.load(topk_weights_ptr + pair_ids, mask=row_mask, other=0.0)
        acc = acc * weight[:, None]
    tl.store(c_ptr + pair_ids[:, None] * stride_cm + offs_n[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty),
             mask=row_mask[:, None] & (offs_n[None, :] < N))


def moe_align_block_size(topk_ids: torch.Tensor, block_m: int, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted_pair_ids, block_expert_ids). The flat pair ids grouped by expert, each expert's run
    padded with the sentinel `num_pairs` to a multiple of `block_m`; and, per block of `block_m`
    entries, its expert (-1 past the last run). Sized for the worst case, so no host sync is needed.
    Ids equal to `num_experts` (another rank's experts) are left out."""
    flat = topk_ids.flatten()
    num_pairs = flat.numel()
    order = flat.argsort(stable=True)
    sorted_experts = flat[order]
    # (not torch.bincount, which reads its input's maximum back to the host on CUDA)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
    counts = counts.scatter_add_(0, flat, torch.ones_like(flat))[:num_experts]
    padded = (counts + block_m - 1) // block_m * block_m
    run_start = counts.cumsum(0) - counts
    padded_end = padded.cumsum(0)
    padded_start = padded_end - padded
    capacity = triton.cdiv(num_pairs + num_experts * (block_m - 1), block_m) * block_m
    local = sorted_experts.clamp(max=num_experts - 1)
    position = torch.arange(num_pairs, device=flat.device)
    dst = padded_start[local] + position - run_start[local]
    dst = torch.where(sorted_experts < num_experts, dst, capacity)  # left out: a slot that is dropped
    sorted_pair_ids = torch.full((capacity + 1,), num_pairs, dtype=torch.int32, device=flat.device)
    sorted_pair_ids.scatter_(0, dst, order.to(torch.int32))
    block_starts = torch.arange(0, capacity, block_m, device=flat.device)
    block_expert_ids = torch.searchsorted(padded_end, block_starts, right=True).to(torch.int32)
    block_expert_ids = torch.where(block_expert_ids < num_experts, block_expert_ids, -1)
    return sorted_pair_ids[:capacity], block_expert_ids


def _launch(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, topk_weights: torch.Tensor,
            sorted_pair_ids: torch.Tensor, block_expert_ids: torch.Tensor, pairs_per_a_row: int,
            mul_routed_weight: bool, block_m: int) -> None:
    num_experts, n, k = b.shape
    block_n, block_k = 64, 32
    grid = (block_expert_ids.numel(), triton.cdiv(n, block_n))
    fused_moe_kernel[grid](
        a, b, c, topk_weights, sorted_pair_ids, block_expert_ids,
        n, k, c.shape[0],
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), c.stride(0), c.stride(1),
        PAIRS_PER_A_ROW=pairs_per_a_row, MUL_ROUTED_WEIGHT=mul_routed_weight,
        IEEE_FP32=a.dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )


def fused_experts_triton(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                         topk_ids: torch.Tensor, act_and_mul: Callable[[torch.Tensor], torch.Tensor],
                         block_m: int | None = None) -> torch.Tensor:
    """What `fused_experts_reference` computes, in two Triton launches."""
    num_tokens, top_k = topk_ids.shape
    num_pairs = num_tokens * top_k
    if block_m is None:  # small blocks waste less padding on decode-sized batches
        block_m = 16 if num_pairs <= 16 * w13.shape[0] else 64
    x = x.contiguous()
    sorted_pair_ids, block_expert_ids = moe_align_block_size(topk_ids, block_m, w13.shape[0])
    weights = topk_weights.float().contiguous()
    gate_up = torch.empty(num_pairs, w13.shape[1], dtype=x.dtype, device=x.device)
    _launch(x, w13, gate_up, weights, sorted_pair_ids, block_expert_ids, top_k, False, block_m)
    # Rows of pairs that no local expert took are never written above, and never read below.
    hidden = act_and_mul(gate_up)
    out = torch.zeros(num_pairs, w2.shape[1], dtype=x.dtype, device=x.device)
    _launch(hidden, w2, out, weights, sorted_pair_ids, block_expert_ids, 1, True, block_m)
    return out.view(num_tokens, top_k, -1).sum(dim=1)


class TritonFusedMoEMethod(FusedMoEMethodBase):
    """The weights as loaded ([experts, out, in], as the kernel reads them), run by `fused_experts_triton`."""

    def apply(self, layer: nn.Module, x: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
        return fused_experts_triton(x, layer.w13_weight, layer.w2_weight, topk_weights, topk_ids, layer.act_and_mul)
