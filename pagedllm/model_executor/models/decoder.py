"""One decoder-only transformer for the Llama family, Qwen2 and Qwen3.

The families differ by flags, not by copied files: Qwen2 adds a bias to Q/K/V, Qwen3 adds
RMSNorm on each head of Q and K, some checkpoints tie the LM head to the embedding.
Weights arrive with Hugging Face names and are packed into fused QKV and gate/up matrices
so each layer runs three large matmuls instead of seven small ones. Under tensor parallelism
(`tp_group` of N ranks) each rank holds 1/N of the heads, of the MLP and of the vocabulary; the
parallel layers slice the full tensors as they load them and add the two all-reduces per layer.

Every layer is built with what `BuildContext` carries (`layers/build_context.py`): its linear
method, the fused elementwise ops, the attention backend. What a constructor says is what runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn
from transformers.activations import ACT2FN

from pagedllm.attention.backend import KVCache
from pagedllm.model_executor.layers.build_context import BuildContext
from pagedllm.model_executor.layers.layernorm import RMSNorm
from pagedllm.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    copy_weight,
)
from pagedllm.model_executor.layers.rotary_embedding import RotaryEmbedding
from pagedllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding


@dataclass(frozen=True)
class ArchFlags:
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool


def arch_flags(architecture: str, config) -> ArchFlags:
    attention_bias = bool(getattr(config, "attention_bias", False))
    mlp_bias = bool(getattr(config, "mlp_bias", False))
    if architecture == "Qwen2ForCausalLM":
        return ArchFlags(qkv_bias=True, o_bias=False, mlp_bias=False, qk_norm=False)
    if architecture == "Qwen3ForCausalLM":
        return ArchFlags(qkv_bias=attention_bias, o_bias=attention_bias, mlp_bias=False, qk_norm=True)
    # LlamaForCausalLM, MistralForCausalLM
    return ArchFlags(qkv_bias=attention_bias, o_bias=attention_bias, mlp_bias=mlp_bias, qk_norm=False)


class Attention(nn.Module):
    def __init__(self, config, flags: ArchFlags, ctx: BuildContext) -> None:
        super().__init__()
        tp_group, method = ctx.tp_group, ctx.linear_methods.linear
        total_heads = config.num_attention_heads
        total_kv_heads = getattr(config, "num_key_value_heads", None) or total_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // total_heads
        self.num_heads = total_heads // tp_group.world_size  # this rank's share
        self.num_kv_heads = total_kv_heads // tp_group.world_size
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, total_heads, total_kv_heads,
                                          bias=flags.qkv_bias, tp_group=tp_group, linear_method=method)
        self.o_proj = RowParallelLinear(total_heads * self.head_dim, config.hidden_size, bias=flags.o_bias,
                                        tp_group=tp_group, linear_method=method)
        if flags.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, ctx.fused_ops)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, ctx.fused_ops)
        self.qk_norm = flags.qk_norm
        self.rotary_emb = RotaryEmbedding(config, self.head_dim, ctx.max_position, ctx.dtype, ctx.fused_ops)
        impl = ctx.attn_backend.get_impl_cls()
        self.attn = impl(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, kv_cache: KVCache, meta: Any) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary_emb(positions, q, k)
        out = self.attn.forward(q, k, v, kv_cache, meta)
        return self.o_proj(out.flatten(1))


class GatedMLP(nn.Module):
    def __init__(self, config, bias: bool, ctx: BuildContext) -> None:
        super().__init__()
        size, method = config.intermediate_size, ctx.linear_methods.linear
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [size, size], bias=bias,
                                                       tp_group=ctx.tp_group, linear_method=method)
        self.down_proj = RowParallelLinear(size, config.hidden_size, bias=bias, tp_group=ctx.tp_group,
                                           linear_method=method)
        self.fused_ops = ctx.fused_ops
        self.act = ACT2FN[config.hidden_act]
        self.is_silu = config.hidden_act == "silu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.is_silu:
            return self.down_proj(self.fused_ops.silu_and_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config, flags: ArchFlags, ctx: BuildContext) -> None:
        super().__init__()
        self.self_attn = Attention(config, flags, ctx)
        self.mlp = GatedMLP(config, flags.mlp_bias, ctx)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ctx.fused_ops)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ctx.fused_ops)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: KVCache,
        meta: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, kv_cache, meta)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class DecoderForCausalLM(nn.Module):
    """`forward` maps a flattened batch of tokens to hidden states; `compute_logits` the rows asked for."""

    def __init__(self, config, architecture: str, ctx: BuildContext) -> None:
        super().__init__()
        flags = arch_flags(architecture, config)
        methods = ctx.linear_methods
        self.config = config
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        # A tied embedding doubles as the LM head: its logits method keeps the plain matrix for the lookup.
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, ctx.tp_group,
                                                   logits_method=methods.tied_lm_head if self.tie_word_embeddings
                                                   else methods.embedding)
        self.layers = nn.ModuleList(DecoderLayer(config, flags, ctx) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, ctx.fused_ops)
        if not self.tie_word_embeddings:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, ctx.tp_group,
                                          logits_method=methods.lm_head)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                meta: Any) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(positions, hidden, residual, kv_cache, meta)
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits, the same on every tensor-parallel rank."""
        head = self.embed_tokens if self.tie_word_embeddings else self.lm_head
        return head.compute_logits(hidden)

    # ----- weights ----------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors in, packing q/k/v and gate/up into their fused matrices.

        Each parallel layer's `weight_loader` keeps this rank's slice of the full tensor.
        """
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            target, shard = _map_hf_name(name)
            if target is None:
                continue
            if target == "lm_head.weight" and self.tie_word_embeddings:
                continue
            if target not in params:
                # a linear method that holds the weight in its own form (GGUF blocks) loads it itself
                try:
                    owner = self.get_submodule(target.rpartition(".")[0]) if target.endswith(".weight") else None
                except AttributeError:
                    owner = None
                method = getattr(owner, "linear_method", None)
                if not getattr(method, "loads_weight", False):
                    raise ValueError(f"checkpoint tensor {name!r} has no place in this model")
                try:
                    method.load_weight(owner, tensor, shard)
                except ValueError as e:
                    raise ValueError(f"checkpoint tensor {name!r} {e}") from e
                loaded.add(target if shard is None else f"{target}:{shard}")
                continue
            if not isinstance(tensor, torch.Tensor):  # still quantised, for a plain parameter
                tensor = tensor.dequantize(params[target].dtype)
            param = params[target]
            weight_loader = getattr(self.get_submodule(target.rpartition(".")[0]), "weight_loader", None)
            with torch.no_grad():
                try:
                    if weight_loader is None:
                        copy_weight(param, tensor)
                    else:
                        weight_loader(param, tensor, shard)
                except ValueError as e:
                    raise ValueError(f"checkpoint tensor {name!r} {e}") from e
            loaded.add(target if shard is None else f"{target}:{shard}")
        missing = [n for n in params if not any(l == n or l.startswith(n + ":") for l in loaded)]
        if missing:
            raise ValueError(f"checkpoint is missing weights, e.g. {missing[:3]}")


_FUSED = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


def _map_hf_name(name: str) -> tuple[str | None, str | int | None]:
    """'model.layers.3.self_attn.k_proj.bias' -> ('layers.3.self_attn.qkv_proj.bias', 'k')."""
    if "rotary_emb" in name:
        return None, None
    if name.startswith("model."):
        name = name[len("model.") :]
    parts = name.split(".")
    if len(parts) >= 2 and parts[-2] in _FUSED:
        fused, shard = _FUSED[parts[-2]]
        parts[-2] = fused
        return ".".join(parts), shard
    return name, None
