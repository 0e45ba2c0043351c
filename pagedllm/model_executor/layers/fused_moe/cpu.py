"""The CPU fused-MoE: tokens sorted by expert, one oneDNN GEMM per expert on weights packed once.

The reference (`reference.py`) gathers each expert's tokens, multiplies them by the plain weight
with `F.linear`, and scatters each expert's weighted output back with an `index_add_`. Here every
expert's gate/up and down matrices are reordered once, after loading, into oneDNN's blocked layout
(as `cpu_packed_linear.py` does for the dense layers); a step gathers the tokens in expert order
once, runs each expert's two GEMMs on its contiguous slice of that one buffer, puts the rows back in
(token, slot) order with one indexed copy, and sums each token's `top_k` rows with one batched
matmul by the routing weights. The loop is over experts (at most 8 for Mixtral), never over tokens.

`benchmarks/moe_cpu.py` measures it against the reference on a Mixtral-shaped layer.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from pagedllm.model_executor.layers.cpu_packed_linear import reorder_for_onednn
from pagedllm.model_executor.layers.fused_moe.method import FusedMoEMethodBase
from pagedllm.model_executor.layers.fused_moe.reference import sort_by_expert


def _packed_linear(x: torch.Tensor, packed_weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed_weight, None, "none", [], "")


def fused_experts_cpu(x: torch.Tensor, w13_packed: list[torch.Tensor], w2_packed: list[torch.Tensor],
                      topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                      act_and_mul: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """What `fused_experts_reference` computes, from per-expert oneDNN-packed weights."""
    num_tokens, top_k = topk_ids.shape
    order, counts = sort_by_expert(topk_ids, len(w13_packed))
    num_pairs = sum(counts)
    if num_pairs == 0:
        return torch.zeros_like(x)
    order = order[:num_pairs]
    x_sorted = x[order // top_k]
    y_sorted = torch.empty_like(x_sorted)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        end = start + count
        h = _packed_linear(x_sorted[start:end], w13_packed[expert])
        y_sorted[start:end] = _packed_linear(act_and_mul(h), w2_packed[expert])
        start = end
    if num_pairs == num_tokens * top_k:
        y = torch.empty_like(y_sorted)
    else:  # pairs routed to another rank's experts add nothing here
        y = x.new_zeros(num_tokens * top_k, x.shape[1])
    y[order] = y_sorted
    weights = topk_weights.to(x.dtype).unsqueeze(1)  # [tokens, 1, top_k]
    return torch.bmm(weights, y.view(num_tokens, top_k, -1)).squeeze(1)


class CpuFusedMoEMethod(FusedMoEMethodBase):
    """Loads the plain [experts, ...] tensors, then keeps one oneDNN-packed matrix per expert."""

    description = "MoE layers with their experts packed for oneDNN"

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        layer.w13_packed = [reorder_for_onednn(w) for w in layer.w13_weight]
        layer.w2_packed = [reorder_for_onednn(w) for w in layer.w2_weight]
        layer.register_parameter("w13_weight", None)
        layer.register_parameter("w2_weight", None)

    def apply(self, layer: nn.Module, x: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
        return fused_experts_cpu(x.contiguous(), layer.w13_packed, layer.w2_packed, topk_weights, topk_ids,
                                 layer.act_and_mul)

    def weight_bytes(self, layer: nn.Module) -> int:
        return sum(w.numel() * w.element_size() for w in layer.w13_packed + layer.w2_packed)
