"""`FusedMoE`: a mixture-of-experts layer's experts, split over a tensor-parallel group.

Routing (`routing.fused_topk`) picks each token's `top_k` experts; the layer's `FusedMoEMethod`
(`method.py`) runs them. Under a tensor-parallel group of N ranks the experts are split one of two
ways, as in vLLM:

- tensor parallelism (the default) shards every expert's intermediate dimension: each rank holds
  1/N of the rows of every expert's gate/up matrix and the matching 1/N of the columns of its down
  matrix, so each rank's output is a partial sum;
- expert parallelism (`enable_expert_parallel=True`) places whole experts on ranks: rank r holds
  experts [r*E/N, (r+1)*E/N), and a token's pairs routed elsewhere add nothing on this rank.

Either way every rank sees every token and one all-reduce sums the partial outputs, so the layer
costs one all-reduce as a dense MLP does. (vLLM's expert parallelism also spans data-parallel ranks
with all-to-all dispatch; here it stays inside the tensor-parallel group.)
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from pagedllm.distributed.parallel_state import TensorParallelGroup
from pagedllm.model_executor.layers.fused_moe.method import FusedMoEMethodBase
from pagedllm.model_executor.layers.fused_moe.reference import UnquantizedFusedMoEMethod, silu_and_mul
from pagedllm.model_executor.layers.fused_moe.routing import fused_topk


class FusedMoE(nn.Module):
    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, renormalize: bool,
                 tp_group: TensorParallelGroup | None = None, enable_expert_parallel: bool = False,
                 quant_method: FusedMoEMethodBase | None = None,
                 act_and_mul: Callable[[torch.Tensor], torch.Tensor] = silu_and_mul) -> None:
        super().__init__()
        self.tp_group = tp_group or TensorParallelGroup()
        size, rank = self.tp_group.world_size, self.tp_group.rank
        if top_k > num_experts:
            raise ValueError(f"num_experts_per_tok ({top_k}) is larger than the number of experts ({num_experts})")
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.use_ep = enable_expert_parallel and size > 1
        if self.use_ep:
            self.local_num_experts = num_experts // size
            self.expert_start = rank * self.local_num_experts
            self.intermediate_rank, self.local_intermediate_size = 0, intermediate_size
        else:
            self.local_num_experts, self.expert_start = num_experts, 0
            self.intermediate_rank, self.local_intermediate_size = rank, intermediate_size // size
        self.act_and_mul = act_and_mul
        self.quant_method = quant_method or UnquantizedFusedMoEMethod()
        self.quant_method.create_weights(self, self.local_num_experts, hidden_size, self.local_intermediate_size)

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: tuple[str, int | None]) -> None:
        """Load one expert's full gate (w1), up (w3) or down (w2) matrix, keeping this rank's share;
        expert None: every expert's, stacked along the first dimension (as GGUF files hold them)."""
        shard, expert = shard_id
        if expert is None:
            if loaded.dim() != 3 or loaded.shape[0] != self.num_experts:
                raise ValueError(f"has shape {tuple(loaded.shape)}, expected {self.num_experts} stacked experts")
            for e in range(self.num_experts):
                self.weight_loader(param, loaded[e], (shard, e))
            return
        local = expert - self.expert_start
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"is for expert {expert}, but the model has {self.num_experts} experts")
        if not 0 <= local < self.local_num_experts:
            return  # another rank's expert
        size, offset = self.local_intermediate_size, self.intermediate_rank * self.local_intermediate_size
        if shard == "w2":  # [hidden, intermediate]: this rank's columns
            expected, dim, dst = (self.hidden_size, self.intermediate_size), 1, param[local]
        else:  # [intermediate, hidden]: this rank's rows, into the gate (w1) or up (w3) half
            expected, dim = (self.intermediate_size, self.hidden_size), 0
            dst = param[local].narrow(0, 0 if shard == "w1" else size, size)
        if tuple(loaded.shape) != expected:
            raise ValueError(f"has shape {tuple(loaded.shape)}, expected {expected}")
        dst.copy_(loaded.narrow(dim, offset, size))

    def forward(self, hidden: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        topk_weights, topk_ids = fused_topk(router_logits, self.top_k, self.renormalize)
        if self.use_ep:  # this rank's experts by local id; the others all become the id "not here"
            local = topk_ids - self.expert_start
            here = (local >= 0) & (local < self.local_num_experts)
            topk_ids = torch.where(here, local, self.local_num_experts)
        out = self.quant_method.apply(self, hidden, topk_weights, topk_ids)
        return self.tp_group.all_reduce(out)
