"""Mixture-of-experts layers: routing, the fused-MoE layer and its three implementations."""

from pagedllm.model_executor.layers.fused_moe.layer import FusedMoE
from pagedllm.model_executor.layers.fused_moe.method import FusedMoEMethodBase
from pagedllm.model_executor.layers.fused_moe.routing import fused_topk
from pagedllm.model_executor.layers.fused_moe.selector import get_fused_moe_method

__all__ = ["FusedMoE", "FusedMoEMethodBase", "fused_topk", "get_fused_moe_method"]
