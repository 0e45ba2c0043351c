"""`BuildContext`: what every layer of one model is built with, chosen once from the engine config.

A layer takes its behaviour when it is constructed and keeps it: the tensor-parallel group it
splits over (and, for a model, the pipeline stage whose layers it holds), the `LinearMethod` that
holds and multiplies its weight (plain, oneDNN-packed, int8), the elementwise ops between the matmuls
(eager, compiled, or the CPU kernels), the attention backend, and how mixture-of-experts layers run
their experts. Reading a model's constructor therefore tells what runs; nothing is patched in after.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from pagedllm.attention.backend import AttentionBackend
from pagedllm.attention.torch_paged_attention import TorchPagedAttentionBackend
from pagedllm.distributed.parallel_state import PipelineParallelGroup, TensorParallelGroup
from pagedllm.model_executor.layers.fused_moe.method import FusedMoEMethodBase
from pagedllm.model_executor.layers.fused_moe.reference import UnquantizedFusedMoEMethod
from pagedllm.model_executor.layers.fused_moe.selector import get_fused_moe_method
from pagedllm.model_executor.layers.fused_ops import EAGER_OPS, FusedOps, fused_ops_for
from pagedllm.model_executor.layers.linear_method import UNQUANTIZED
from pagedllm.model_executor.layers.quantization import LinearMethods, get_linear_methods


@dataclass(frozen=True)
class BuildContext:
    dtype: torch.dtype
    max_position: int  # rotary tables are built this long (the engine's max_model_len)
    tp_group: TensorParallelGroup = field(default_factory=TensorParallelGroup)
    linear_methods: LinearMethods = LinearMethods(UNQUANTIZED, UNQUANTIZED, UNQUANTIZED)
    fused_ops: FusedOps = EAGER_OPS
    attn_backend: type[AttentionBackend] = TorchPagedAttentionBackend
    pp_group: PipelineParallelGroup = field(default_factory=PipelineParallelGroup)
    # mixture-of-experts layers: how their experts run, and whether whole experts go to ranks
    fused_moe_method: FusedMoEMethodBase = field(default_factory=UnquantizedFusedMoEMethod)
    enable_expert_parallel: bool = False

    @classmethod
    def for_engine(cls, dtype: torch.dtype, max_position: int, device: torch.device, quantization: str | None,
                   compile_fused_ops: bool, attn_backend: type[AttentionBackend],
                   tp_group: TensorParallelGroup | None = None,
                   pp_group: PipelineParallelGroup | None = None,
                   enable_expert_parallel: bool = False, quant_config: Any = None) -> "BuildContext":
        return cls(
            dtype=dtype,
            max_position=max_position,
            tp_group=tp_group or TensorParallelGroup(),
            linear_methods=get_linear_methods(quantization, dtype, device, quant_config),
            fused_ops=fused_ops_for(device, compile_fused_ops),
            attn_backend=attn_backend,
            pp_group=pp_group or PipelineParallelGroup(),
            fused_moe_method=get_fused_moe_method(device, dtype),
            enable_expert_parallel=enable_expert_parallel,
        )
