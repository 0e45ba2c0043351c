"""The batched LoRA shrink and expand as Triton kernels (GPUs; under TRITON_INTERPRET=1 on CPU for tests).

Same layout and contract as `lora/punica.py`: `lora_a` [slots, S*R, in], `lora_b` [out, slots, R],
each output row reading its slice's R ranks of the shrink, one slot index per row (-1: the base
model, whose rows are left as they are). Each program takes one
row and a tile of the output features and reads only that row's slot, so the work is that of the
row's own adapter, whatever `max_loras` is. A row per program leaves tensor cores idle; vLLM's
kernels group the rows of one adapter into tiles (sorting by slot first), the next step for
large prefills.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.lora.ops.layout import Slices, row_slices


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, idx_ptr, h_ptr, in_features, rank,
                   stride_xt, stride_as, stride_ar, stride_ht,
                   BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """h[t, :] = A[slot(t)] x[t] (fp32), zero for base-model rows."""
    t = tl.program_id(0)
    slot = tl.load(idx_ptr + t)
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    if slot >= 0:
        for k0 in range(0, in_features, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + t * stride_xt + offs_k, mask=offs_k < in_features, other=0.0).to(tl.float32)
            a = tl.load(a_ptr + slot * stride_as + offs_r[:, None] * stride_ar + offs_k[None, :],
                        mask=(offs_r[:, None] < rank) & (offs_k[None, :] < in_features), other=0.0).to(tl.float32)
            acc += tl.sum(a * x[None, :], axis=1)
    tl.store(h_ptr + t * stride_ht + offs_r, acc, mask=offs_r < rank)


@triton.jit
def _expand_kernel(h_ptr, b_ptr, idx_ptr, row_slice_ptr, y_ptr, out_features, rank,
                   stride_ht, stride_bn, stride_bs, stride_yt,
                   BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """y[t, n] += B[n, slot(t)] h[t, slice(n)], for an n-tile; nothing for base-model rows."""
    t = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    slot = tl.load(idx_ptr + t)
    if slot >= 0:
        mask_n = offs_n < out_features
        offs_r = tl.arange(0, BLOCK_R)
        mask = mask_n[:, None] & (offs_r[None, :] < rank)
        first = tl.load(row_slice_ptr + offs_n, mask=mask_n, other=0) * rank
        h = tl.load(h_ptr + t * stride_ht + first[:, None] + offs_r[None, :], mask=mask, other=0.0)
        b = tl.load(b_ptr + offs_n[:, None] * stride_bn + slot * stride_bs + offs_r[None, :],
                    mask=mask, other=0.0).to(tl.float32)
        delta = tl.sum(b * h, axis=1)
        y = tl.load(y_ptr + t * stride_yt + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        tl.store(y_ptr + t * stride_yt + offs_n, (y + delta).to(y_ptr.dtype.element_ty), mask=mask_n)


def add_lora_triton(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                    indices: torch.Tensor, slices: Slices) -> torch.Tensor:
    """y + B[i] A[i] x per row (rows with i = -1 unchanged), as a new tensor."""
    tokens, in_features = x.shape
    shrink_rank = lora_a.shape[1]  # S * R
    out_features, _, rank = lora_b.shape
    x, lora_a, lora_b = x.contiguous(), lora_a.contiguous(), lora_b.contiguous()
    indices = indices.to(torch.int32).contiguous()
    out = y.contiguous().clone()
    if tokens == 0:
        return out
    h = torch.empty(tokens, shrink_rank, dtype=torch.float32, device=x.device)
    _shrink_kernel[(tokens,)](x, lora_a, indices, h, in_features, shrink_rank, x.stride(0), lora_a.stride(0),
                              lora_a.stride(1), h.stride(0), BLOCK_R=triton.next_power_of_2(shrink_rank), BLOCK_K=64)
    block_n = 64
    row_slice = row_slices(slices, x.device).to(torch.int32)
    _expand_kernel[(tokens, triton.cdiv(out_features, block_n))](
        h, lora_b, indices, row_slice, out, out_features, rank, h.stride(0), lora_b.stride(0), lora_b.stride(1),
        out.stride(0), BLOCK_N=block_n, BLOCK_R=triton.next_power_of_2(rank))
    return out
