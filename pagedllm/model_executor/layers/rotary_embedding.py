"""Rotary position embedding over a precomputed cos/sin table indexed by position.

The inverse frequencies come from transformers' own RoPE initialisers, so every scaling
variant a checkpoint declares (llama3, linear, yarn, ...) is computed exactly as the
reference does.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from pagedllm.model_executor.layers.fused_ops import EAGER_OPS, FusedOps


def _per_layer_type(config, layer_type: str | None) -> bool:
    """Whether the config keeps one set of rope parameters per layer type (Gemma 3's local and global bases)."""
    params = getattr(config, "rope_parameters", None)
    return bool(params) and layer_type is not None and isinstance(params.get(layer_type), dict)


def _rope_parameters(config, layer_type: str | None) -> dict | None:
    params = getattr(config, "rope_parameters", None)
    return params[layer_type] if _per_layer_type(config, layer_type) else params


def _rope_type_and_theta(config, layer_type: str | None = None) -> tuple[str, float]:
    params = _rope_parameters(config, layer_type)
    if not params:  # transformers 4.x spelling
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    return rope_type, float(params.get("rope_theta", 10000.0))


def rotary_dim(config, head_dim: int, layer_type: str | None = None) -> int:
    """The leading dimensions of each head that rotate (Phi-4-mini's partial_rotary_factor: 0.75)."""
    params = _rope_parameters(config, layer_type) or {}
    factor = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None)) or 1.0
    return int(head_dim * float(factor))


def compute_inv_freq(config, head_dim: int, max_position: int | None = None,
                     layer_type: str | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the cos/sin scale. LongRoPE (Phi-3) picks its long factors when the engine's
    context (`max_position`) exceeds the original one, as vLLM does: transformers switches per forward call
    by that call's length, which agrees whenever every sequence stays on one side of the original length."""
    rope_type, theta = _rope_type_and_theta(config, layer_type)
    if rope_type == "default":
        dim = rotary_dim(config, head_dim, layer_type)
        return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unsupported rope type {rope_type!r}")
    if rope_type == "dynamic":
        raise ValueError("dynamic NTK rope scaling depends on sequence length and is not supported")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"), seq_len=max_position,
                                                        layer_type=layer_type if _per_layer_type(config, layer_type)
                                                        else None)
    return inv_freq.float(), float(scaling)


class RotaryEmbedding(nn.Module):
    def __init__(self, config, head_dim: int, max_position: int, dtype: torch.dtype,
                 fused_ops: FusedOps = EAGER_OPS, layer_type: str | None = None) -> None:
        super().__init__()
        self._args = (config, head_dim, max_position, dtype)
        self.layer_type = layer_type  # Gemma 3: "sliding_attention" layers use the local base
        self.fused_ops = fused_ops
        self.rotary_dim = rotary_dim(config, head_dim, layer_type)
        self.partial = self.rotary_dim != head_dim
        self.register_buffer("cos", torch.empty(max_position, self.rotary_dim // 2, dtype=dtype), persistent=False)
        self.register_buffer("sin", torch.empty(max_position, self.rotary_dim // 2, dtype=dtype), persistent=False)
        if self.cos.device.type != "meta":
            self.init_cache()

    def init_cache(self) -> None:
        """Fill the cos/sin table (again after the model was built on the meta device)."""
        config, head_dim, max_position, dtype = self._args
        inv_freq, scaling = compute_inv_freq(config, head_dim, max_position, self.layer_type)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float), inv_freq).to(self.cos.device)
        self.cos.copy_((freqs.cos() * scaling).to(dtype))
        self.sin.copy_((freqs.sin() * scaling).to(dtype))

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q [T, heads, dim] and k [T, kv_heads, dim] in the half-split (NeoX/HF) layout
        (the CPU kernels rotate them in place: they are views of the QKV projection's output). With a
        partial rotary factor only the first `rotary_dim` dimensions of each head turn."""
        if not self.partial:
            return self.fused_ops.rotary(positions, q, k, self.cos, self.sin)
        dim = self.rotary_dim
        q_rot, k_rot = self.fused_ops.rotary(positions, q[..., :dim], k[..., :dim], self.cos, self.sin)
        return torch.cat([q_rot, q[..., dim:]], dim=-1), torch.cat([k_rot, k[..., dim:]], dim=-1)
