"""The readable fused-MoE: tokens sorted by expert, one matmul per expert over its contiguous slice.

Every other path (`cpu.py`, `triton_moe.py`) is tested against `fused_experts_reference`. Routing
gives each token `top_k` (token, expert) pairs; sorting the pairs by expert puts each expert's
tokens side by side, so an expert runs as two dense matmuls on its slice (gate/up, then down)
instead of once per token. The weighted outputs are summed back into their tokens.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.model_executor.layers.fused_moe.method import FusedMoEMethodBase


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def sort_by_expert(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, list[int]]:
    """(order, counts): `order[j]` is the flat pair index (token * top_k + slot) at sorted position
    j, pairs of expert 0 first; `counts[e]` how many pairs expert e got. Ids equal to `num_experts`
    (experts held by another rank) sort last and are not counted."""
    flat = topk_ids.flatten()
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=num_experts + 1)[:num_experts].tolist()
    return order, counts


def fused_experts_reference(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                            topk_ids: torch.Tensor,
                            act_and_mul: Callable[[torch.Tensor], torch.Tensor] = silu_and_mul) -> torch.Tensor:
    """[tokens, hidden]: each token's experts' outputs, weighted by the routing weights and summed.

    w13: [experts, 2 * intermediate, hidden] (gate rows then up rows); w2: [experts, hidden, intermediate].
    """
    top_k = topk_ids.shape[1]
    order, counts = sort_by_expert(topk_ids, w13.shape[0])
    flat_weights = topk_weights.flatten()
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        pairs = order[start:start + count]
        tokens = pairs // top_k
        y = F.linear(act_and_mul(F.linear(x[tokens], w13[expert])), w2[expert])
        out.index_add_(0, tokens, y.float() * flat_weights[pairs, None])
        start += count
    return out.to(x.dtype)


class UnquantizedFusedMoEMethod(FusedMoEMethodBase):
    """The weights as loaded, run by `fused_experts_reference`."""

    def apply(self, layer: nn.Module, x: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
        return fused_experts_reference(x, layer.w13_weight, layer.w2_weight, topk_weights, topk_ids,
                                       layer.act_and_mul)
