"""`FusedMoEMethod`: how a fused-MoE layer holds its experts' weights and runs them.

The MoE counterpart of `layers/linear_method.py` (vLLM's `FusedMoEMethodBase`). The layer
(`layer.py`) decides which experts and which slice of each it holds and routes the tokens; its
method decides in what form the weights are kept and which kernel multiplies:

- `UnquantizedFusedMoEMethod` (`reference.py`): plain PyTorch, the reference the others are tested
  against;
- `CpuFusedMoEMethod` (`cpu.py`): each expert's matrices packed for oneDNN, one GEMM per expert;
- `TritonFusedMoEMethod` (`triton_moe.py`): one Triton kernel launch per GEMM, all experts at once.

`selector.py` picks one for the whole model from the device and dtype. The weights every method
loads into are vLLM's: `w13_weight` [experts, 2 * intermediate, hidden]
(gate rows, then up rows) and `w2_weight` [experts, hidden, intermediate] (down). The model loader
calls `process_weights_after_loading` once every tensor is in, as it does for linear methods.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn


class FusedMoEMethodBase(ABC):
    """One way of holding and applying the experts of a MoE layer; one instance serves every layer."""

    # Shown in the start-up log line after the layer count, starting "MoE" (None: nothing to report).
    description: str | None = None

    def create_weights(self, layer: nn.Module, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        """Register the tensors the checkpoint's expert weights load into (this rank's experts and slice)."""
        layer.w13_weight = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size),
                                        requires_grad=False)
        layer.w2_weight = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size), requires_grad=False)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Turn the loaded weights into this method's form (default: keep them)."""

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
        """sum_k topk_weights[t, k] * expert_{topk_ids[t, k]}(x[t]) for every token t.

        `topk_ids` are this layer's local expert ids; an id equal to the number of local experts
        marks a pair routed to an expert on another rank, which contributes nothing here.
        """

    def weight_bytes(self, layer: nn.Module) -> int:
        return sum(p.numel() * p.element_size() for p in (layer.w13_weight, layer.w2_weight) if p is not None)

