"""RMSNorm, with the residual add fused in as vLLM's layers do it."""

from __future__ import annotations

import torch
from torch import nn

from pagedllm.model_executor.layers.fused_ops import EAGER_OPS, FusedOps


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6, fused_ops: FusedOps = EAGER_OPS) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.fused_ops = fused_ops

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Without `residual`: norm(x). With it: (norm(x + residual), x + residual)."""
        if residual is None:
            return self.fused_ops.rms_norm(x, self.weight, self.eps)
        return self.fused_ops.add_rms_norm(x, residual, self.weight, self.eps)
