"""`LoRALinearMethod`: a layer's own method plus the batched LoRA term of its adapters.

It wraps whatever method holds the base weight (plain, oneDNN-packed, int8) and adds
`PunicaWrapper.add_lora` to its output, so LoRA is a method given at build time like any other
(`layers/linear_method.py`), and the layers and the loader do not know about it.

Tensor parallelism shards A and B the way the base layer is sharded (as vLLM's LoRA layers do):
- column-parallel (QKV, gate/up): A whole on every rank, B cut to this rank's output rows of each
  slice, so each rank computes its own output columns;
- row-parallel (O, down): A cut to this rank's input columns, B whole. Each rank's B A x is then a
  partial sum, added before the layer's all-reduce, which completes it together with the base product.
`slices_of` says, per layer, which Hugging Face projections it fuses and where this rank's share of each lies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pagedllm.lora.punica import PunicaWrapper
from pagedllm.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from pagedllm.model_executor.layers.linear_method import LinearMethodBase


@dataclass(frozen=True)
class LoRASlice:
    """One Hugging Face projection inside a (possibly fused) layer, as this rank holds it."""

    target: str  # 'q_proj', ...
    out_offset: int  # where its rows start in the layer's local output
    out_size: int  # its local output rows
    out_start: int  # the first of those rows in the full B (column-parallel sharding)
    in_start: int  # the first input column of this rank in the full A (row-parallel sharding)
    in_size: int  # this rank's input columns


def slices_of(layer: nn.Module, module_name: str) -> list[LoRASlice]:
    """The projections `layer` (the model's module `module_name`) computes and this rank's share of each."""
    rank = layer.tp_rank
    in_size = layer.weight_shape[1]
    if isinstance(layer, QKVParallelLinear):
        q, kv = layer.num_heads * layer.head_size, layer.num_kv_heads * layer.head_size
        return [LoRASlice("q_proj", 0, q, rank * q, 0, in_size), LoRASlice("k_proj", q, kv, rank * kv, 0, in_size),
                LoRASlice("v_proj", q + kv, kv, rank * kv, 0, in_size)]
    if isinstance(layer, MergedColumnParallelLinear):
        local = [size // layer.tp_size for size in layer.output_sizes]
        return [LoRASlice(name, sum(local[:i]), local[i], rank * local[i], 0, in_size)
                for i, name in enumerate(("gate_proj", "up_proj"))]
    if isinstance(layer, RowParallelLinear):
        out = layer.weight_shape[0]
        return [LoRASlice(module_name.rpartition(".")[2], 0, out, 0, rank * in_size, in_size)]
    return []


class LoRALinearMethod(LinearMethodBase):
    """`base`'s product plus each row's adapter term; the stacked slots are the layer's `lora_a`/`lora_b`,
    allocated by the model manager once the model is built (`LoRAModelManager`)."""

    def __init__(self, base: LinearMethodBase, punica: PunicaWrapper) -> None:
        self.base = base
        self.punica = punica
        self.description = base.description

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int) -> None:
        self.base.create_weights(layer, input_size, output_size)
        layer.weight_shape = (output_size, input_size)  # the base method may repack `weight`

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        self.base.process_weights_after_loading(layer)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        out = self.base.apply(layer, x, bias)
        lora_a = getattr(layer, "lora_a", None)
        if lora_a is None:
            return out
        return self.punica.add_lora(out, x, lora_a, layer.lora_b, layer.lora_slices)

    def weight_bytes(self, layer: nn.Module) -> int:
        return self.base.weight_bytes(layer)
