"""`CpuPackedLinearMethod`: linear weights in oneDNN's blocked layout on CPU, reordered once after loading.

`F.linear` on CPU hands the BLAS a row-major weight on every call. oneDNN's `_linear_pointwise`
on a weight reordered once into its own blocked layout (what inductor does for frozen weights)
streams it faster: measured on 2 cores for SmolLM2's shapes, 1.3-1.6x for decode-sized batches in
float32 and bfloat16 (decode reads every weight once per step, so this is memory bandwidth won
back), and about the same for prefill-sized ones. The packed tensor replaces the plain one, so
the weights are held once; the numbers are float32 (or bf16) matmuls either way, only the
summation order differs.

Picked on CPU for float32 and bfloat16 when PyTorch is built with oneDNN, unless
`PAGEDLLM_CPU_KERNELS=0` (`cpu_packing_available`). A tied LM head (the embedding, also read by the
embedding lookup, which needs the plain matrix) gets a packed copy beside it (`keep_weight=True`):
one more copy of the embedding in memory (113 MB for SmolLM2 in float32) for a decode step's largest
single matmul, whose plain `aten::mm` read it at 10 GB/s (W1: 5 ms of an 87-92 ms float32 decode
step, +4-5% output tok/s).
"""

from __future__ import annotations

import torch
from torch import nn

from pagedllm import cpu_ops
from pagedllm.model_executor.layers.linear_method import LinearMethodBase

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)
# oneDNN picks its blocking for a typical batch size; a decode batch is the case that matters.
BATCH_SIZE_HINT = 32


def cpu_packing_available(device: torch.device, dtype: torch.dtype) -> bool:
    return (
        device.type == "cpu"
        and dtype in PACKABLE_DTYPES
        and torch.backends.mkldnn.is_available()
        and cpu_ops.cpu_fast_paths_enabled()
    )


def reorder_for_onednn(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), BATCH_SIZE_HINT)


class CpuPackedLinearMethod(LinearMethodBase):
    """Loads the plain matrix, then keeps it in oneDNN's layout as `layer.packed_weight`.

    `keep_weight`: keep the plain `weight` too, for a layer whose weight something else reads
    (a tied embedding's lookup); the packed copy then costs the matrix's size again.
    """

    def __init__(self, keep_weight: bool = False) -> None:
        self.keep_weight = keep_weight
        self.description = "packed for oneDNN" if not keep_weight else "packed beside the plain matrix"

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        layer.packed_weight = reorder_for_onednn(layer.weight)
        if not self.keep_weight:
            layer.register_parameter("weight", None)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), layer.packed_weight, bias, "none", [], "")

    def weight_bytes(self, layer: nn.Module) -> int:
        packed = layer.packed_weight
        return packed.numel() * packed.element_size()
