"""A decode-only CPU step through every decoder layer of a GGUF model in one C++ op.

At batch 1 with 4-bit weights a step's matmuls are no longer most of it: the layer-by-layer
forward makes ~20 Python calls per layer (module calls, op wrappers, allocations) around its four
`gguf_linear` kernels, milliseconds a step on a slow core. `pagedllm_cpu::gguf_decode_layers`
runs the same kernels in the same order from C++ (`csrc/cpu/gguf_decode_layers.cpp`), so the
hidden states are the layer-by-layer path's, bit for bit; that path stays the reference and
runs every step this one does not take (prefills, mixed steps, several KV-cache groups).

It applies to the plain Llama-family layer (no biases, no per-head norms, full-width rotary, SiLU
MLP, no soft-cap, no Gemma norms, no experts) in float32 whose projections are single-segment GGUF
blocks with no LoRA, on CPU with the kernels built; `for_model` says None otherwise.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pagedllm import cpu_ops
from pagedllm.attention.backend import KVCache
from pagedllm.attention.torch_paged_attention import TorchAttentionMetadata, TorchPagedAttention
from pagedllm.model_executor.layers.fused_ops import CpuKernelOps
from pagedllm.model_executor.layers.quantization.gguf import GGUFLinearMethod
from pagedllm.model_executor.layers.quantization.gguf_blocks import BlockQuantizedWeight


def _blocks(linear: nn.Module) -> BlockQuantizedWeight | None:
    """The layer's one block-quantised weight, when it is held that way with nothing added to it."""
    if type(linear.linear_method) is not GGUFLinearMethod or linear.bias is not None:
        return None  # a LoRA wrapper, another method, or a bias
    segments = linear.gguf_segments
    if len(segments) != 1 or not isinstance(segments[0].weight, BlockQuantizedWeight):
        return None
    return segments[0].weight


class GGUFDecodeStep:
    """The layers' tensors laid out once for the op (they do not change after loading)."""

    def __init__(self, layers: list[nn.Module], weights: list[torch.Tensor], bits: list[int], windows: list[int],
                 eps: float) -> None:
        attn = layers[0].self_attn
        self.rotary_ops = attn.rotary_emb.fused_ops
        self.num_heads, self.num_kv_heads, self.scale = attn.num_heads, attn.num_kv_heads, attn.attn.scale
        self.weights, self.bits, self.windows, self.eps = weights, bits, windows, eps

    @classmethod
    def for_model(cls, layers: list[nn.Module], dtype: torch.dtype) -> GGUFDecodeStep | None:
        """The step for these (loaded) decoder layers, or None when some layer is not one it runs."""
        # The cheap checks first: any other model must not build the CPU kernels here (a GPU run's first step).
        qkv = getattr(getattr(layers[0], "self_attn", None), "qkv_proj", None) if layers else None
        if dtype != torch.float32 or qkv is None or _blocks(qkv) is None:
            return None
        if not cpu_ops.cpu_kernels_available():
            return None
        weights: list[torch.Tensor] = []
        bits: list[int] = []
        windows: list[int] = []
        first = layers[0].self_attn
        for layer in layers:
            attn, mlp = layer.self_attn, layer.mlp
            impl = getattr(attn, "attn", None)
            if (not getattr(attn, "fuse_qkv_step", False) or type(impl) is not TorchPagedAttention
                    or impl.logits_soft_cap is not None or layer.sandwich_norms or not getattr(mlp, "is_silu", False)
                    or not isinstance(attn.rotary_emb.fused_ops, CpuKernelOps)
                    or not isinstance(layer.input_layernorm.fused_ops, CpuKernelOps)
                    or (attn.num_heads, attn.num_kv_heads, impl.scale) != (first.num_heads, first.num_kv_heads,
                                                                          first.attn.scale)
                    or layer.input_layernorm.eps != layers[0].input_layernorm.eps
                    or layer.post_attention_layernorm.eps != layers[0].input_layernorm.eps):
                return None
            linears = [attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj]
            projections = [_blocks(linear) for linear in linears]
            if any(w is None for w in projections):
                return None
            qkv, o, gate_up, down = projections
            rope = attn.rotary_emb
            weights += [layer.input_layernorm.weight.detach(), rope.cos, rope.sin, qkv.qweight, qkv.scales, qkv.mins,
                        o.qweight, o.scales, o.mins, layer.post_attention_layernorm.weight.detach(),
                        gate_up.qweight, gate_up.scales, gate_up.mins, down.qweight, down.scales, down.mins]
            for w, linear in zip(projections, linears):  # gguf_linear's bits and act_bits
                bits += [w.bits, linear.gguf_act_bits]
            windows.append(impl.sliding_window or 0)
        return cls(layers, weights, bits, windows, layers[0].input_layernorm.eps)

    def runs(self, hidden: torch.Tensor, meta: Any, kv_caches: list[KVCache]) -> bool:
        """Whether this step is one it takes: decodes only, one metadata for every layer, a float32 or
        bfloat16 cache (not fp8), and the rotary the kernel does at this many rows (not the compiled
        one, above its row threshold)."""
        return (type(meta) is TorchAttentionMetadata and meta.decode_only
                and kv_caches[0][0].dtype in cpu_ops.KERNEL_DTYPES
                and self.rotary_ops.rotates_in_kernel(hidden.shape[0]))

    def __call__(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None,
                 kv_caches: list[KVCache], meta: TorchAttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden, residual) after the layers, as the layer-by-layer loop returns them."""
        return torch.ops.pagedllm_cpu.gguf_decode_layers(
            hidden, residual, positions, self.weights, self.bits, self.windows, [k for k, _ in kv_caches],
            [v for _, v in kv_caches], meta.slot_mapping, meta.decode_block_tables, meta.decode_seq_lens,
            self.num_heads, self.num_kv_heads, self.scale, self.eps)
