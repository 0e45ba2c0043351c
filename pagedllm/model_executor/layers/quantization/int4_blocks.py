"""GPTQ, AWQ and compressed-tensors group-quantized weights re-expressed, once at load, in the blocked
form the GGUF CPU kernel multiplies (`gguf_blocks.BlockQuantizedWeight`, `csrc/cpu/gguf_gemm.cpp`).

The two forms mean the same numbers. A checkpoint's weight is w[n, k] = scale[g, n] * (q[k, n] - zero[g, n])
with g the group of input k (`int_groups.IntGroups`); the kernel's is, per output row and block of 32
inputs, w = scale * q + min with q unsigned. Where every block of 32 inputs lies in one group, the
block takes its group's scale and min = -scale * zero, and q as it is (4-bit values stay 4 bits;
8-bit ones go to the kernel's 8-bit rows). Both products are exact in float32 (a float16 or bfloat16
scale times an integer below 256), so `BlockQuantizedWeight.dequantize` gives the checkpoint's
dequantized matrix bit for bit; only the kernel's q8 activations change the numbers.

Act order (GPTQ `desc_act`, compressed-tensors `actorder: "group"`) scatters each group's inputs
along k. The inputs are then sorted by group once here (`input_perm`, stable) so that groups are
contiguous, and each call gathers the activations' columns in that order (one `index_select`, as
vLLM's exllama and Marlin paths do): sum_k x[k] w[n, k] is the same sum in any order of k.

A layer the kernel cannot hold (a group that is not whole blocks of 32 on this rank: group sizes of
16 or 8, or act-order groups split unevenly over tensor-parallel ranks; other bit widths) is left to
the caller's dequantized form; `blocked_form` says why.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from pagedllm.model_executor.layers.quantization.gguf_blocks import BLOCK, BlockQuantizedWeight, pack
from pagedllm.model_executor.layers.quantization.int_groups import IntGroups

KERNEL_BITS = (4, 8)


class Int4Blocks(NamedTuple):
    """A layer's weight in the kernel's form, and the order its inputs are read in (None: as they come)."""

    weight: BlockQuantizedWeight
    input_perm: torch.Tensor | None  # int64 [in]: column i of the blocked weight is input input_perm[i]

    @property
    def nbytes(self) -> int:
        perm = self.input_perm
        return self.weight.nbytes + (0 if perm is None else perm.numel() * perm.element_size())

    def dequantize(self) -> torch.Tensor:
        """The float32 [out, in] matrix, with the inputs in the checkpoint's order."""
        w = self.weight.dequantize()
        if self.input_perm is None:
            return w
        out = torch.empty_like(w)
        out[:, self.input_perm] = w
        return out


def blocked_form(groups: IntGroups, bits: int) -> Int4Blocks | str:
    """`groups` (`PackedIntLinearMethod.unpack`) as blocks of 32 for the kernel, or the reason it cannot be."""
    k, n = groups.q.shape
    if bits not in KERNEL_BITS:
        return f"{bits}-bit weights (the kernel holds 4- or 8-bit ones)"
    if k % BLOCK:
        return f"an input size of {k}, not a multiple of {BLOCK}"
    g = groups.g.long()
    perm = None if bool((g[1:] >= g[:-1]).all()) else torch.argsort(g, stable=True)
    g_sorted = g if perm is None else g[perm]
    blocks = g_sorted.view(k // BLOCK, BLOCK)
    if not bool((blocks == blocks[:, :1]).all()):
        return f"groups that are not whole blocks of {BLOCK} inputs"
    block_group = blocks[:, 0]  # [in / 32]: each block's row of the scale and zero tables
    q = groups.q if perm is None else groups.q[perm]
    if int(q.min()) < 0 or int(q.max()) >= 1 << bits:
        raise ValueError(f"a {bits}-bit weight holds values outside 0..{(1 << bits) - 1}")
    scales = groups.scales.float()[block_group]  # [in / 32, out]
    mins = -(scales * groups.zeros[block_group].float())
    weight = BlockQuantizedWeight(bits=bits, qweight=pack(q.t().to(torch.uint8).contiguous(), bits),
                                  scales=scales.t().contiguous(), mins=mins.t().contiguous())
    return Int4Blocks(weight, perm)


__all__ = ["Int4Blocks", "blocked_form", "KERNEL_BITS"]
