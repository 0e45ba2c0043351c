"""The mixture-of-experts block that replaces the dense MLP in Mixtral, Qwen2-MoE and Qwen3-MoE layers.

The families differ only by what their configs say, read once into `MoEFlags`: how many experts
and how many per token, the experts' intermediate size, whether the top-k weights are
renormalised (Mixtral always; Qwen by `norm_topk_prob`), which layers are sparse
(`decoder_sparse_step`, `mlp_only_layers`: the others keep a dense MLP) and whether a shared
expert, scaled by a sigmoid gate, is added to every token (Qwen2-MoE). The experts themselves run
in `layers/fused_moe/`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from pagedllm.model_executor.layers.build_context import BuildContext
from pagedllm.model_executor.layers.fused_moe import FusedMoE
from pagedllm.model_executor.layers.linear import ReplicatedLinear
from pagedllm.model_executor.layers.linear_method import UNQUANTIZED

# Each MoE architecture, and the dense family whose attention and norms it shares.
MOE_ARCHITECTURES = {
    "MixtralForCausalLM": "MistralForCausalLM",
    "Qwen2MoeForCausalLM": "Qwen2ForCausalLM",
    "Qwen3MoeForCausalLM": "Qwen3ForCausalLM",
}


@dataclass(frozen=True)
class MoEFlags:
    num_experts: int
    top_k: int
    intermediate_size: int  # of one expert
    renormalize: bool
    shared_expert_intermediate_size: int = 0  # 0: no shared expert
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()

    @classmethod
    def from_config(cls, architecture: str, config) -> "MoEFlags":
        num_experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
        top_k = config.num_experts_per_tok
        if not num_experts or not 1 <= top_k <= num_experts:
            raise ValueError(f"{architecture}: num_experts_per_tok ({top_k}) must be between 1 and the number of "
                             f"experts ({num_experts})")
        if architecture == "MixtralForCausalLM":
            return cls(num_experts, top_k, config.intermediate_size, renormalize=True)
        return cls(
            num_experts, top_k, config.moe_intermediate_size, renormalize=bool(config.norm_topk_prob),
            shared_expert_intermediate_size=getattr(config, "shared_expert_intermediate_size", 0) or 0,
            decoder_sparse_step=getattr(config, "decoder_sparse_step", 1) or 1,
            mlp_only_layers=tuple(getattr(config, "mlp_only_layers", None) or ()),
        )

    def is_sparse(self, layer_idx: int) -> bool:
        """transformers' rule: a MoE block unless listed in mlp_only_layers or off the sparse step."""
        return layer_idx not in self.mlp_only_layers and (layer_idx + 1) % self.decoder_sparse_step == 0


class SparseMoeBlock(nn.Module):
    """Router, routed experts and, where the family has one, a gated shared expert."""

    def __init__(self, config, moe: MoEFlags, ctx: BuildContext, shared_expert: nn.Module | None = None) -> None:
        super().__init__()
        # The router is small and decides which experts run: kept whole and unquantized, as in vLLM.
        self.gate = ReplicatedLinear(config.hidden_size, moe.num_experts, linear_method=UNQUANTIZED)
        act_and_mul = ctx.fused_ops.silu_and_mul if config.hidden_act == "silu" else _act_and_mul(config.hidden_act)
        self.experts = FusedMoE(moe.num_experts, moe.top_k, config.hidden_size, moe.intermediate_size,
                                moe.renormalize, ctx.tp_group, ctx.enable_expert_parallel, ctx.fused_moe_method,
                                act_and_mul)
        self.shared_expert = shared_expert
        if shared_expert is not None:
            self.shared_expert_gate = ReplicatedLinear(config.hidden_size, 1, linear_method=UNQUANTIZED)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.experts(hidden, self.gate(hidden))
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(hidden)) * self.shared_expert(hidden)
        return out


def _act_and_mul(hidden_act: str):
    from transformers.activations import ACT2FN

    act = ACT2FN[hidden_act]

    def act_and_mul(x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return act(gate) * up

    return act_and_mul


_EXPERT_SHARD = {"w1": "w1", "gate_proj": "w1", "w3": "w3", "up_proj": "w3", "w2": "w2", "down_proj": "w2"}
# One expert's matrix ('experts.5.up_proj.weight'), or every expert's stacked ('experts.up_proj', from GGUF).
_EXPERT_NAME = re.compile(r"(?P<prefix>.*\.experts)\.(?:(?P<expert>\d+)\.(?P<proj>\w+)\.weight|(?P<stacked>\w+))")


def map_expert_name(name: str) -> tuple[str, tuple[str, int | None]] | None:
    """'layers.3.mlp.experts.5.up_proj.weight' -> ('layers.3.mlp.experts.w13_weight', ('w3', 5)), and
    'layers.3.mlp.experts.up_proj' (all experts stacked) -> (..., ('w3', None)); None for a name
    that is not a routed expert's weight."""
    m = _EXPERT_NAME.fullmatch(name)
    proj = m and (m["proj"] or m["stacked"])
    if proj not in _EXPERT_SHARD:
        return None
    shard = _EXPERT_SHARD[proj]
    expert = None if m["expert"] is None else int(m["expert"])
    return f"{m['prefix']}.{'w2' if shard == 'w2' else 'w13'}_weight", (shard, expert)
