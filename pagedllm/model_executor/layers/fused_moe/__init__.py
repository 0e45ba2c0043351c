"""Mixture-of-experts layers: routing, the fused-MoE layer and its three implementations."""

from pagedllm.model_executor.layers.fused_moe.layer import EXPERT_SHARDS, FusedMoE
from pagedllm.model_executor.layers.fused_moe.method import FusedMoEMethodBase, get_fused_moe_method
from pagedllm.model_executor.layers.fused_moe.routing import fused_topk

__all__ = ["EXPERT_SHARDS", "FusedMoE", "FusedMoEMethodBase", "fused_topk", "get_fused_moe_method"]
