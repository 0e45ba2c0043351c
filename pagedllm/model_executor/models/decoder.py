"""One decoder-only transformer for the Llama family, Qwen2 and Qwen3.

The families differ by flags, not by copied files: Qwen2 adds a bias to Q/K/V, Qwen3 adds
RMSNorm on each head of Q and K, some checkpoints tie the LM head to the embedding.
Weights arrive with Hugging Face names and are packed into fused QKV and gate/up matrices
so each layer runs three large matmuls instead of seven small ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn
from transformers.activations import ACT2FN

from pagedllm.attention.metadata import AttentionMetadata
from pagedllm.attention.torch_paged_attention import KVCache, TorchPagedAttention
from pagedllm.model_executor.layers.layernorm import RMSNorm
from pagedllm.model_executor.layers.rotary_embedding import RotaryEmbedding


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
    def __init__(self, config, flags: ArchFlags, max_position: int, dtype: torch.dtype, attn_backend: type) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=flags.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=flags.o_bias)
        if flags.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qk_norm = flags.qk_norm
        self.rotary_emb = RotaryEmbedding(config, self.head_dim, max_position, dtype)
        self.attn = attn_backend(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5)

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata
    ) -> torch.Tensor:
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
    def __init__(self, config, bias: bool) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config, flags: ArchFlags, max_position: int, dtype: torch.dtype, attn_backend: type) -> None:
        super().__init__()
        self.self_attn = Attention(config, flags, max_position, dtype, attn_backend)
        self.mlp = GatedMLP(config, flags.mlp_bias)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: KVCache,
        meta: AttentionMetadata,
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

    def __init__(
        self, config, architecture: str, max_position: int, dtype: torch.dtype, attn_backend: type = TorchPagedAttention
    ) -> None:
        super().__init__()
        flags = arch_flags(architecture, config)
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, flags, max_position, dtype, attn_backend) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if not self.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache], meta: AttentionMetadata
    ) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(positions, hidden, residual, kv_cache, meta)
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.embed_tokens.weight if self.tie_word_embeddings else self.lm_head.weight
        return torch.nn.functional.linear(hidden, weight)

    # ----- weights ----------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors in, packing q/k/v and gate/up into their fused matrices."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            target, shard = _map_hf_name(name)
            if target is None:
                continue
            if target == "lm_head.weight" and self.tie_word_embeddings:
                continue
            if target not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no place in this model")
            param = params[target]
            with torch.no_grad():
                dst = self._shard_view(param, target, shard)
                if dst.shape != tensor.shape:
                    raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(dst.shape)}")
                dst.copy_(tensor)
            loaded.add(target if shard is None else f"{target}:{shard}")
        missing = [n for n in params if not any(l == n or l.startswith(n + ":") for l in loaded)]
        if missing:
            raise ValueError(f"checkpoint is missing weights, e.g. {missing[:3]}")

    def _shard_view(self, param: torch.Tensor, target: str, shard: str | None) -> torch.Tensor:
        if shard is None:
            return param
        layer_idx = int(target.split(".")[1])
        if ".qkv_proj." in target:
            attn = self.layers[layer_idx].self_attn
            offsets = {"q": (0, attn.q_size), "k": (attn.q_size, attn.kv_size), "v": (attn.q_size + attn.kv_size, attn.kv_size)}
        else:
            size = self.layers[layer_idx].mlp.intermediate_size
            offsets = {"gate": (0, size), "up": (size, size)}
        start, length = offsets[shard]
        return param.narrow(0, start, length)


_FUSED = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", "gate"),
    "up_proj": ("gate_up_proj", "up"),
}


def _map_hf_name(name: str) -> tuple[str | None, str | None]:
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
