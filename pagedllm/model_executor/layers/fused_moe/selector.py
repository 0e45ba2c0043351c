"""Which `FusedMoEMethod` a model's MoE layers are built with, chosen once from the device and dtype."""

from __future__ import annotations

import torch

from pagedllm.model_executor.layers.cpu_packed_linear import cpu_packing_available
from pagedllm.model_executor.layers.fused_moe.cpu import CpuFusedMoEMethod
from pagedllm.model_executor.layers.fused_moe.method import FusedMoEMethodBase
from pagedllm.model_executor.layers.fused_moe.reference import UnquantizedFusedMoEMethod


def get_fused_moe_method(device: torch.device, dtype: torch.dtype) -> FusedMoEMethodBase:
    """oneDNN-packed experts on CPU (where packing is available), Triton on CUDA, else the reference."""
    if cpu_packing_available(device, dtype):
        return CpuFusedMoEMethod()
    if device.type == "cuda":
        # imported here: triton is an optional dependency (the `gpu` extra)
        from pagedllm.model_executor.layers.fused_moe.triton_moe import TritonFusedMoEMethod

        return TritonFusedMoEMethod()
    return UnquantizedFusedMoEMethod()
