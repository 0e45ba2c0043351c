"""The GPU path for GPTQ / AWQ / compressed-tensors layers: the integers stay packed in memory and a
Triton kernel dequantizes each tile of them on its way into the matmul.

Every format is first brought to one layout (`IntGroupWeight`): GPTQ's, values packed 32 // bits to
an int32 along the input in plain order, with scales and zero points [groups, out] in the model
dtype and each input's group in `g_idx` (act order included: the kernel gathers the scale and zero
rows of the K-tile's inputs). A program computes a BLOCK_M x BLOCK_N tile of y = x W^T, reading a
BLOCK_K x BLOCK_N tile of words per step, shifting out each input's value, and multiplying
(q - zero) * scale by the activations' tile with `tl.dot`.

Tested on CPU under `TRITON_INTERPRET=1` against the dequantized matrix (tests/test_quantized_checkpoints.py);
not yet run or tuned on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@triton.jit
def int_group_matmul_kernel(
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, g_idx_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_qk, stride_sg, stride_ym,
    BITS: tl.constexpr, IEEE_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y[m, n] = sum_k x[m, k] * scales[g[k], n] * (q[k, n] - zeros[g[k], n]) for one tile."""
    PER_WORD: tl.constexpr = 32 // BITS
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        tile_mask = mask_k[:, None] & mask_n[None, :]
        words = tl.load(qweight_ptr + (offs_k // PER_WORD)[:, None] * stride_qk + offs_n[None, :],
                        mask=tile_mask, other=0)
        q = (words >> ((offs_k % PER_WORD) * BITS)[:, None]) & ((1 << BITS) - 1)
        g = tl.load(g_idx_ptr + offs_k, mask=mask_k, other=0)
        scales = tl.load(scales_ptr + g[:, None] * stride_sg + offs_n[None, :], mask=tile_mask, other=0.0)
        zeros = tl.load(zeros_ptr + g[:, None] * stride_sg + offs_n[None, :], mask=tile_mask, other=0.0)
        w = ((q.to(tl.float32) - zeros.to(tl.float32)) * scales.to(tl.float32)).to(x.dtype)
        if IEEE_FP32:
            acc += tl.dot(x, w, input_precision="ieee")
        else:
            acc += tl.dot(x, w)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned `bits`-bit values [K, N] packed along K into int32 [K / (32 / bits), N], value i of a
    word at bits [bits * i, bits * (i + 1)) (GPTQ's layout)."""
    per_word = 32 // bits
    v = values.to(torch.int64).reshape(values.shape[0] // per_word, per_word, values.shape[1])
    shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=values.device)[None, :, None]
    words = (v << shifts).sum(dim=1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


@dataclass
class IntGroupWeight:
    """A layer's weight as the kernel reads it (see the module docstring)."""

    qweight: torch.Tensor  # [in / per_word, out] int32
    scales: torch.Tensor  # [groups, out], model dtype
    zeros: torch.Tensor  # [groups, out], model dtype
    g_idx: torch.Tensor  # [in] int32
    bits: int

    @classmethod
    def from_groups(cls, q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g: torch.Tensor, bits: int,
                    dtype: torch.dtype) -> "IntGroupWeight":
        """From a format's unpacked integers q [in, out], zeros and scales [groups, out], groups g [in]."""
        return cls(pack_int32(q, bits).contiguous(), scales.to(dtype).contiguous(), zeros.to(dtype).contiguous(),
                   g.to(torch.int32).contiguous(), bits)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros, self.g_idx))


def int_group_linear(x: torch.Tensor, weight: IntGroupWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T + b with W dequantized tile by tile inside the kernel."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    m, k = x2.shape
    n = weight.qweight.shape[1]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m:
        block_m = 16 if m <= 16 else 32 if m <= 32 else 64
        block_n, block_k = 64, 32
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
        int_group_matmul_kernel[grid](
            x2, weight.qweight, weight.scales, weight.zeros, weight.g_idx, y, m, n, k,
            x2.stride(0), weight.qweight.stride(0), weight.scales.stride(0), y.stride(0),
            BITS=weight.bits, IEEE_FP32=x.dtype == torch.float32,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        )
    if bias is not None:
        y += bias
    return y.reshape(*shape[:-1], n)
