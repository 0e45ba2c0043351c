"""Linear weights in oneDNN's blocked layout on CPU, reordered once after loading.

`F.linear` on CPU hands the BLAS a row-major weight on every call. oneDNN's `_linear_pointwise`
on a weight reordered once into its own blocked layout (what inductor does for frozen weights)
streams it faster: measured on 2 cores for SmolLM2's shapes, 1.3-1.6x for decode-sized batches in
float32 and bfloat16 (decode reads every weight once per step, so this is memory bandwidth won
back), and about the same for prefill-sized ones. The packed tensor replaces the plain one, so
the weights are held once; the numbers are float32 (or bf16) matmuls either way, only the
summation order differs.

Used on CPU for float32 and bfloat16 when PyTorch is built with oneDNN, unless
`PAGEDLLM_CPU_KERNELS=0`. A tied LM head (the embedding, also read by the embedding lookup, which
needs the plain matrix) gets a packed copy beside it: one more copy of the embedding in memory
(113 MB for SmolLM2 in float32) for a decode step's largest single matmul, whose plain `aten::mm`
read it at 10 GB/s (W1: 5 ms of an 87-92 ms float32 decode step, +4-5% output tok/s).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm import cpu_ops
from pagedllm.model_executor.layers.int8_quantization import Int8LinearWeight, int8_linear

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)
# oneDNN picks its blocking for a typical batch size; a decode batch is the case that matters.
BATCH_SIZE_HINT = 32


def packing_wanted(device: torch.device, dtype: torch.dtype) -> bool:
    return (
        device.type == "cpu"
        and dtype in PACKABLE_DTYPES
        and torch.backends.mkldnn.is_available()
        and cpu_ops.cpu_fast_paths_enabled()
    )


def _reordered(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), BATCH_SIZE_HINT)


def pack_linear_weights(model: nn.Module, modules: tuple[type, ...]) -> int:
    """Reorder the weight of every module of the given types in place; returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(module, modules) and getattr(module, "weight", None) is not None:
            packed = _reordered(module.weight)
            module.register_parameter("weight", None)
            module.packed_weight = packed
            count += 1
    return count


def pack_tied_lm_head(embedding: nn.Module) -> int:
    """Give a tied embedding a packed copy for its LM-head matmul; returns the bytes it adds."""
    embedding.packed_weight = _reordered(embedding.weight)
    return embedding.weight.numel() * embedding.weight.element_size()


def linear(x: torch.Tensor, weight: torch.Tensor | None, packed_weight: torch.Tensor | Int8LinearWeight | None,
           bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T + b with whichever form of W the layer holds: plain, oneDNN-packed, or int8
    (`quantization="int8"`, layers/int8_quantization.py)."""
    if packed_weight is None:
        return F.linear(x, weight, bias)
    if isinstance(packed_weight, Int8LinearWeight):
        return int8_linear(x, packed_weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed_weight, bias, "none", [], "")
