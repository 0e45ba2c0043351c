"""Small helpers shared by the kernels' launchers."""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True under `TRITON_INTERPRET=1`, where kernels run on CPU tensors through NumPy."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def compute_in_fp32(dtype: torch.dtype, cache_dtype: torch.dtype | None = None) -> bool:
    """Whether kernels should upcast their tiles to fp32 before multiplying.

    On a GPU, fp16/bf16 tiles go to the tensor cores as they are (accumulating in fp32), and
    fp32 tiles are already fp32. The interpreter's NumPy has no bfloat16 arithmetic (it
    silently yields garbage), so there every tile is upcast first. A cache stored in another
    dtype than the query (`kv_cache_dtype`) cannot meet it in one dot either.
    """
    return interpreting() or dtype == torch.float32 or (cache_dtype is not None and cache_dtype != dtype)


def padded(n: int, minimum: int = 1) -> int:
    """`n` rounded up to a power of two (Triton tile shapes must be powers of two)."""
    return max(minimum, triton.next_power_of_2(n))


@functools.lru_cache(maxsize=None)
def num_compute_units(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; a nominal 1 elsewhere (the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def check_last_dim_contiguous(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.stride(-1) != 1:
            raise ValueError(f"kernels need a unit stride on head_dim, got strides {tuple(t.stride())}")


@triton.jit
def soft_capped_log2_scores(raw, scale, soft_cap):
    """Gemma 2's capped scores, `soft_cap * tanh(raw * scale / soft_cap)`, in base 2 like the rest
    (tanh written with exp, which every Triton version and the interpreter have)."""
    x = raw * (scale / soft_cap)
    tanh = 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)
    return tanh * (soft_cap * 1.4426950408889634)


@triton.jit
def dot(a, b):
    """`a @ b` accumulated in fp32. fp32 operands multiply exactly (IEEE), never as TF32, so the
    fp32 path matches PyTorch's; fp16/bf16 operands go to the tensor cores."""
    if a.dtype == tl.float32:
        result = tl.dot(a, b, input_precision="ieee")
    else:
        result = tl.dot(a, b)
    return result
