"""The GPU path for `quantization="gguf"`: a Triton kernel that reads GGUF layers in the blocked form
the CPU kernels read (`gguf_blocks.BlockQuantizedWeight`) and dequantises each tile of it on its way
into `tl.dot`.

The layout is kept as it is on CUDA (the tensors are only moved to the device): the 4-bit form is the
file's `qs` bytes, and the 8-bit forms are 16-byte runs of one block's half, so a tile of *bytes* is a
contiguous load either way, and it is the activations that are gathered in the bytes' order:
- 4 bits (Q4_0, Q4_1, Q4_K): byte j of block b holds element 32 b + j in its low nibble and
  32 b + j + 16 in its high one. A tile of bytes is two products: low nibbles by the activations of
  the first halves, high nibbles by those of the second halves.
- 8 bits (Q8_0, Q5_0, Q5_1, Q5_K, Q6_K): groups of 4 blocks, the first 16 elements of each block and
  then the last 16 (a last group of fewer blocks the same way round); byte p maps to one element.
Dot products do not care about the order of their terms, so nothing is reordered at load, and the
weights in device memory are the CPU form's bytes: the file's bytes plus float32 scales and mins
(about 6 bits a weight for Q4_1, 12 for Q6_K's per-16 scales; docs/quantization.md).

Activations are not quantised (unlike the CPU kernels' 15-bit blocks): a tile's weights become
w = scale * q + min in float32, then the activations' dtype, and `tl.dot` accumulates in float32
(IEEE float32 products for a float32 model, as the int4 kernel in `triton_int_matmul.py`). Under
the interpreter every product is float32 (its NumPy has no bfloat16 arithmetic), so the rounding
of a bfloat16/float16 tile is only exercised on a GPU.

At a batch of one row a layer of N outputs is only N / BLOCK_N programs, too few for a GPU's
SMs, so small batches split K over programs that add their float32 partial sums atomically
(`split_k`).

Tested on CPU under `TRITON_INTERPRET=1` (tests/test_triton_gguf_matmul.py); not yet run or tuned on
a GPU (`benchmarks/gpu_check.py --sections gguf_kernels` is the check to run there).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from pagedllm.attention.ops.utils import interpreting
from pagedllm.model_executor.layers.quantization.gguf_blocks import BLOCK, BlockQuantizedWeight

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _dequantized_tile(q, scales_ptr, mins_ptr, elem, offs_n, mask, stride_sn, SUB: tl.constexpr):
    """scale * q + min in float32 for a [BLOCK_K, BLOCK_N] tile of q, element `elem` of each row."""
    sub = elem // SUB
    s = tl.load(scales_ptr + offs_n[None, :] * stride_sn + sub[:, None], mask=mask, other=0.0)
    m = tl.load(mins_ptr + offs_n[None, :] * stride_sn + sub[:, None], mask=mask, other=0.0)
    return q.to(tl.float32) * s + m


@triton.jit
def gguf_block_matmul_kernel(
    x_ptr, qweight_ptr, scales_ptr, mins_ptr, bias_ptr, y_ptr,
    M, N, K, K_BYTES, BYTES_PER_SPLIT,
    stride_xm, stride_qn, stride_sn, stride_ym,
    BITS: tl.constexpr, SUB: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y[m, n] (+)= sum_k x[m, k] * (scales[n, k / SUB] * q[n, k] + mins[n, k / SUB]) + bias[n], over
    the weight bytes [pid_k * BYTES_PER_SPLIT, (pid_k + 1) * BYTES_PER_SPLIT) of each row, BLOCK_K
    bytes a step. ATOMIC: add into a float32 y (split K), the bias from the first split only.
    FP32_DOT: multiply in IEEE float32 (a float32 model, and the interpreter, whose NumPy has no
    bfloat16); otherwise the tile is rounded to the activations' dtype for the tensor cores."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    nb = K // 32  # blocks of 32 per row
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    start = pid_k * BYTES_PER_SPLIT
    for p0 in range(start, start + BYTES_PER_SPLIT, BLOCK_K):
        offs_p = p0 + tl.arange(0, BLOCK_K)  # byte positions in a row
        mask_p = offs_p < K_BYTES
        tile_mask = mask_p[:, None] & mask_n[None, :]
        q = tl.load(qweight_ptr + offs_n[None, :] * stride_qn + offs_p[:, None], mask=tile_mask, other=0)
        if BITS == 4:
            lo = (offs_p // 16) * 32 + offs_p % 16  # the element in each byte's low nibble; +16: the high one
            hi = lo + 16
            x_lo = tl.load(x_ptr + offs_m[:, None] * stride_xm + lo[None, :],
                           mask=mask_m[:, None] & mask_p[None, :], other=0.0)
            x_hi = tl.load(x_ptr + offs_m[:, None] * stride_xm + hi[None, :],
                           mask=mask_m[:, None] & mask_p[None, :], other=0.0)
            w_lo = _dequantized_tile(q & 0x0F, scales_ptr, mins_ptr, lo, offs_n, tile_mask, stride_sn, SUB)
            w_hi = _dequantized_tile(q >> 4, scales_ptr, mins_ptr, hi, offs_n, tile_mask, stride_sn, SUB)
            if FP32_DOT:
                acc += tl.dot(x_lo.to(tl.float32), w_lo, input_precision="ieee")
                acc += tl.dot(x_hi.to(tl.float32), w_hi, input_precision="ieee")
            else:
                acc += tl.dot(x_lo, w_lo.to(x_lo.dtype))
                acc += tl.dot(x_hi, w_hi.to(x_hi.dtype))
        else:
            # group order: per 4 blocks (fewer in a last group), 16-byte runs of block bb's half h, all
            # the first halves, then the second ones
            g = offs_p // 128
            in_group = offs_p % 128
            blocks_here = tl.maximum(tl.minimum(nb - 4 * g, 4), 1)  # (1 past the row's end: masked anyway)
            run = in_group // 16
            half = run // blocks_here
            elem = g * 128 + (run % blocks_here) * 32 + half * 16 + offs_p % 16
            xs = tl.load(x_ptr + offs_m[:, None] * stride_xm + elem[None, :],
                         mask=mask_m[:, None] & mask_p[None, :], other=0.0)
            w = _dequantized_tile(q, scales_ptr, mins_ptr, elem, offs_n, tile_mask, stride_sn, SUB)
            if FP32_DOT:
                acc += tl.dot(xs.to(tl.float32), w, input_precision="ieee")
            else:
                acc += tl.dot(xs, w.to(xs.dtype))
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    out_mask = mask_m[:, None] & mask_n[None, :]
    if ATOMIC:
        tl.atomic_add(y_ptrs, acc, mask=out_mask)
    else:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


def _tiles(m: int, bits: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K in weight bytes). Untuned: chosen for the interpreter's and a
    GPU's first run alike (tl.dot needs 16 at least each way)."""
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    return block_m, 64, 32 if bits == 4 else 64


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: enough to exercise the split path at small shapes
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_split_k(m: int, n: int, k_bytes: int, device: torch.device) -> int:
    """Splits of K so that a small batch still gives every SM a program: 1 once the output tiles
    alone do, at most one split per 512 weight bytes of a row. (A first guess, not tuned.)"""
    block_m, block_n, _ = _tiles(m, 8)
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    want = triton.cdiv(_num_sms(device), tiles)
    return max(1, min(want, k_bytes // 512))


def gguf_block_matmul(x2: torch.Tensor, weight: BlockQuantizedWeight, out: torch.Tensor,
                      bias: torch.Tensor | None = None, split_k: int | None = None) -> torch.Tensor:
    """out[:] = x2 W^T + bias, W in blocks (`out` may be a column slice of a wider output; x2 [M, K]
    with unit stride along K). `split_k`: K split over that many programs (None: `default_split_k`)."""
    m, k = x2.shape
    n, k_w = weight.shape
    if k != k_w or k % BLOCK:
        raise ValueError(f"activations of {k} columns against a weight of {k_w}; both must be equal multiples of 32")
    if weight.bits not in (4, 8) or weight.sub not in (16, 32):
        raise ValueError(f"no kernel for {weight.bits}-bit blocks of {weight.sub}")
    if x2.dtype not in KERNEL_DTYPES:
        raise ValueError(f"activations must be one of {KERNEL_DTYPES}, not {x2.dtype}")
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if m == 0:
        return out
    k_bytes = weight.qweight.shape[1]
    block_m, block_n, block_k = _tiles(m, weight.bits)
    split = split_k or default_split_k(m, n, k_bytes, x2.device)
    per_split = triton.cdiv(triton.cdiv(k_bytes, split), block_k) * block_k  # whole steps a split
    split = triton.cdiv(k_bytes, per_split)
    target = out if split == 1 else torch.zeros(m, n, dtype=torch.float32, device=x2.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), split)
    gguf_block_matmul_kernel[grid](
        x2, weight.qweight, weight.scales, weight.mins, bias if bias is not None else weight.scales, target,
        m, n, k, k_bytes, per_split,
        x2.stride(0), weight.qweight.stride(0), weight.scales.stride(0), target.stride(0),
        BITS=weight.bits, SUB=weight.sub, HAS_BIAS=bias is not None, ATOMIC=split > 1,
        FP32_DOT=x2.dtype == torch.float32 or interpreting(), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    if split > 1:
        out.copy_(target)
    return out


def triton_gguf_linear(x: torch.Tensor, segments: list, out_features: int,
                       bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T + b over a GGUF layer's row segments (`gguf.Segment`), in x's dtype: blocks through the
    kernel, float32 rows (types without a kernel) through `F.linear`, each into its columns."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape[0], out_features, dtype=x.dtype, device=x.device)
    for seg in segments:
        cols = out[:, seg.start:seg.end] if len(segments) > 1 else out
        seg_bias = None if bias is None else bias[seg.start:seg.end]
        if isinstance(seg.weight, BlockQuantizedWeight):
            gguf_block_matmul(x2, seg.weight, cols, seg_bias)
        else:
            cols.copy_(F.linear(x2.float(), seg.weight, None if seg_bias is None else seg_bias.float()))
    return out.reshape(*shape[:-1], out_features)


# ----- on the device: moving, and the embedding's rows -----------------------------------------------

def segments_to(segments: list, device: torch.device) -> None:
    """Each segment's tensors onto `device`, in place (the loader decodes blocks on the host)."""
    for seg in segments:
        w = seg.weight
        if isinstance(w, BlockQuantizedWeight):
            seg.weight = BlockQuantizedWeight(w.bits, w.qweight.to(device), w.scales.to(device), w.mins.to(device))
        else:
            seg.weight = w.to(device)


def embedding(segments: list, input_ids: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    """The rows of a blocks-held embedding for `input_ids` on the segments' device, dequantised."""
    flat = input_ids.reshape(-1)
    out = None
    for seg in segments:
        ids = (flat - seg.start).clamp(0, seg.end - seg.start - 1)  # no host sync to count the ids inside
        w = seg.weight
        rows = (w.rows(ids).dequantize() if isinstance(w, BlockQuantizedWeight) else w.index_select(0, ids)).to(dtype)
        out = rows if out is None else torch.where(((flat >= seg.start) & (flat < seg.end))[:, None], rows, out)
    return out.reshape(*input_ids.shape, width)


__all__ = ["embedding", "gguf_block_matmul", "segments_to", "triton_gguf_linear"]
