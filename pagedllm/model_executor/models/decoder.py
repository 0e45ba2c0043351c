"""One decoder-only transformer for the Llama family, Qwen2, Qwen3, Phi-3 and Gemma 2/3, and the
mixture-of-experts kin of Llama and Qwen.

The families differ by flags, not by copied files: Qwen2 adds a bias to Q/K/V, Qwen3 adds
RMSNorm on each head of Q and K, some checkpoints tie the LM head to the embedding. Phi-3 ships
its Q/K/V and gate/up already fused. Gemma scales the embedding by sqrt(hidden_size), its norms
by (1 + weight), and wraps attention and the MLP each in a pre- and a post-norm; Gemma 2 soft-caps
the attention scores and the final logits. Which layers are local (sliding-window) and which rope
base each uses comes from the config (`layer_types.py`). Mixtral, Qwen2-MoE and Qwen3-MoE replace
the MLP of (some) layers by a mixture of experts (`models/moe.py`).
Weights arrive with Hugging Face names and are packed into fused QKV and gate/up matrices
so each layer runs three large matmuls instead of seven small ones. Under tensor parallelism
(`tp_group` of N ranks) each rank holds 1/N of the heads, of the MLP and of the vocabulary; the
parallel layers slice the full tensors as they load them and add the two all-reduces per layer.
Under pipeline parallelism (`pp_group`) a stage holds only its run of the layers and passes its
hidden states on (`models/pipeline.py`).

Every layer is built with what `BuildContext` carries (`layers/build_context.py`): its linear
method, the fused elementwise ops, the attention backend. What a constructor says is what runs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import islice
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
)
from pagedllm.model_executor.layers.rotary_embedding import RotaryEmbedding
from pagedllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from pagedllm.model_executor.models.gguf_decode_step import GGUFDecodeStep
from pagedllm.model_executor.models.layer_types import layer_sliding_windows, layer_types
from pagedllm.model_executor.models.moe import MOE_ARCHITECTURES, MoEFlags, SparseMoeBlock, map_expert_name
from pagedllm.model_executor.models.pipeline import MissingLayer, is_stage_param, receive_hidden, send_hidden
from pagedllm.model_executor.weight_utils import load_param, raise_if_missing


_NOT_BUILT = object()


@dataclass(frozen=True)
class ArchFlags:
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    moe: MoEFlags | None = None  # mixture of experts in place of the dense MLP (models/moe.py)
    # Gemma: RMSNorm scales by (1 + weight) (folded into the weight as it loads), norms before and
    # after both attention and the MLP, and the embedding scaled by sqrt(hidden_size).
    gemma_norms: bool = False


def arch_flags(architecture: str, config) -> ArchFlags:
    if architecture in MOE_ARCHITECTURES:  # the dense family's attention, with experts
        return replace(arch_flags(MOE_ARCHITECTURES[architecture], config),
                       moe=MoEFlags.from_config(architecture, config))
    attention_bias = bool(getattr(config, "attention_bias", False))
    mlp_bias = bool(getattr(config, "mlp_bias", False))
    if architecture == "Gemma2ForCausalLM":
        return ArchFlags(qkv_bias=attention_bias, o_bias=attention_bias, mlp_bias=False, qk_norm=False,
                         gemma_norms=True)
    if architecture == "Gemma3ForCausalLM":
        return ArchFlags(qkv_bias=attention_bias, o_bias=attention_bias, mlp_bias=False, qk_norm=True,
                         gemma_norms=True)
    if architecture == "Qwen2ForCausalLM":
        return ArchFlags(qkv_bias=True, o_bias=False, mlp_bias=False, qk_norm=False)
    if architecture == "Qwen3ForCausalLM":
        return ArchFlags(qkv_bias=attention_bias, o_bias=attention_bias, mlp_bias=False, qk_norm=True)
    # LlamaForCausalLM, MistralForCausalLM, Phi3ForCausalLM
    return ArchFlags(qkv_bias=attention_bias, o_bias=attention_bias, mlp_bias=mlp_bias, qk_norm=False)


class Attention(nn.Module):
    def __init__(self, config, flags: ArchFlags, ctx: BuildContext, layer_idx: int) -> None:
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
        self.rotary_emb = RotaryEmbedding(config, self.head_dim, ctx.max_position, ctx.dtype, ctx.fused_ops,
                                          layer_type=layer_types(config)[layer_idx])
        # Gemma scales queries by query_pre_attn_scalar, which need not be head_dim.
        scale = (getattr(config, "query_pre_attn_scalar", None) or self.head_dim) ** -0.5
        # Rotary, K/V write and attention may run as one op (`AttentionImpl.forward_qkv`) when the
        # rotation is the plain full-width one the CPU kernel does; q/k-norm sits between QKV and rotary.
        self.fuse_qkv_step = not flags.qk_norm and not self.rotary_emb.partial
        impl = ctx.attn_backend.get_impl_cls()
        self.attn = impl(self.num_heads, self.num_kv_heads, self.head_dim, scale,
                         sliding_window=layer_sliding_windows(config)[layer_idx],
                         logits_soft_cap=getattr(config, "attn_logit_softcapping", None))

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, kv_cache: KVCache, meta: Any) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)
        if self.fuse_qkv_step and self.rotary_emb.fused_ops.rotates_in_kernel(qkv.shape[0]):
            rope = self.rotary_emb
            out = self.attn.forward_qkv(qkv, positions, rope.cos, rope.sin, kv_cache, meta)
            if out is not None:
                return self.o_proj(out)
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
    def __init__(self, config, bias: bool, ctx: BuildContext, intermediate_size: int | None = None) -> None:
        super().__init__()
        size, method = intermediate_size or config.intermediate_size, ctx.linear_methods.linear
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [size, size], bias=bias,
                                                       tp_group=ctx.tp_group, linear_method=method)
        self.down_proj = RowParallelLinear(size, config.hidden_size, bias=bias, tp_group=ctx.tp_group,
                                           linear_method=method)
        self.fused_ops = ctx.fused_ops
        act = getattr(config, "hidden_activation", None) or config.hidden_act  # Gemma names it hidden_activation
        self.act = ACT2FN[act]
        self.is_silu = act == "silu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.is_silu:
            return self.down_proj(self.fused_ops.silu_and_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config, flags: ArchFlags, ctx: BuildContext, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, flags, ctx, layer_idx)
        moe = flags.moe
        if moe is not None and moe.is_sparse(layer_idx):
            shared = moe.shared_expert_intermediate_size
            self.mlp = SparseMoeBlock(config, moe, ctx, GatedMLP(config, False, ctx, shared) if shared else None)
        else:
            self.mlp = GatedMLP(config, flags.mlp_bias, ctx)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ctx.fused_ops)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ctx.fused_ops)
        self.sandwich_norms = flags.gemma_norms
        if self.sandwich_norms:  # Gemma: post_attention_layernorm normalises attention's output instead
            self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ctx.fused_ops)
            self.post_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ctx.fused_ops)

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
        if self.sandwich_norms:
            hidden, residual = self.pre_feedforward_layernorm(self.post_attention_layernorm(hidden), residual)
            return self.post_feedforward_layernorm(self.mlp(hidden)), residual
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class DecoderForCausalLM(nn.Module):
    """`forward` maps a flattened batch of tokens to hidden states; `compute_logits` the rows asked for."""

    def __init__(self, config, architecture: str, ctx: BuildContext) -> None:
        super().__init__()
        flags = arch_flags(architecture, config)
        methods = ctx.linear_methods
        self.config = config
        self.dtype = ctx.dtype
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.pp_group = pp = ctx.pp_group
        self.start_layer, self.end_layer = pp.layer_range(config.num_hidden_layers)
        # A tied embedding doubles as the LM head: its logits method keeps the plain matrix for the lookup.
        self.holds_embedding = pp.is_first or (pp.is_last and self.tie_word_embeddings)
        if self.holds_embedding:
            self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, ctx.tp_group,
                                                       logits_method=methods.tied_lm_head if self.tie_word_embeddings
                                                       else methods.embedding)
        self.layers = nn.ModuleList(DecoderLayer(config, flags, ctx, i) if self.start_layer <= i < self.end_layer
                                    else MissingLayer() for i in range(config.num_hidden_layers))
        self.gemma_norms = flags.gemma_norms
        self.final_logit_softcapping = getattr(config, "final_logit_softcapping", None)
        # A decode-only CPU step of a GGUF model runs every layer in one C++ op (`gguf_decode_step.py`).
        self._gguf_decode_step: GGUFDecodeStep | None | object = _NOT_BUILT
        if pp.is_last:
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, ctx.fused_ops)
            if not self.tie_word_embeddings:
                self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, ctx.tp_group,
                                              logits_method=methods.lm_head)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The token embeddings (a vision-language model replaces its image placeholders' rows)."""
        hidden = self.embed_tokens(input_ids)
        if self.gemma_norms:  # sqrt(hidden_size) rounded to the activations' dtype, as transformers does
            hidden = hidden * torch.tensor(self.config.hidden_size**0.5, dtype=hidden.dtype)
        return hidden

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                meta: Any, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """`kv_caches`: one per layer of this stage. `meta`: the step's attention metadata, or a list of
        each layer's (local and global layers reading through different block tables:
        `model_executor/kv_cache_groups.py`). `inputs_embeds`: the first layer's input when the caller
        built it (images' rows in it), else the embeddings of `input_ids`. A stage before the last
        returns its hidden states after sending them on (nothing reads them here)."""
        pp = self.pp_group
        if pp.is_first:
            hidden = self.embed_input_ids(input_ids) if inputs_embeds is None else inputs_embeds
            residual = None
        else:
            hidden, residual = receive_hidden(pp, positions.shape[0], self.config.hidden_size, self.dtype,
                                              positions.device)
        step = self._whole_step(hidden, meta, kv_caches)
        if step is not None:  # every layer in one C++ op
            hidden, residual = step(positions, hidden, residual, kv_caches, meta)
        else:
            metas = meta[self.start_layer : self.end_layer] if isinstance(meta, list) else [meta] * len(kv_caches)
            # islice, not self.layers[a:b], which builds a new ModuleList every step
            layers = islice(self.layers, self.start_layer, self.end_layer)
            for layer, kv_cache, layer_meta in zip(layers, kv_caches, metas):
                hidden, residual = layer(positions, hidden, residual, kv_cache, layer_meta)
        if not pp.is_last:
            send_hidden(pp, hidden, residual)
            return hidden
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def _whole_step(self, hidden: torch.Tensor, meta: Any, kv_caches: list[KVCache]) -> GGUFDecodeStep | None:
        """The one-op path through this stage's layers when this step can take it (a decode-only CPU
        step of a GGUF model: `gguf_decode_step.py`); built at the first forward, after loading."""
        if self._gguf_decode_step is _NOT_BUILT:
            layers = list(islice(self.layers, self.start_layer, self.end_layer))
            self._gguf_decode_step = GGUFDecodeStep.for_model(layers, self.dtype)
        step = self._gguf_decode_step
        return step if step is not None and step.runs(hidden, meta, kv_caches) else None

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits, the same on every tensor-parallel rank."""
        head = self.embed_tokens if self.tie_word_embeddings else self.lm_head
        logits = head.compute_logits(hidden)
        if self.final_logit_softcapping:  # Gemma 2: cap * tanh(logits / cap)
            cap = self.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return logits

    # ----- weights ----------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors in, packing q/k/v and gate/up into their fused matrices.

        Each parallel layer's `weight_loader` keeps this rank's slice of the full tensor.
        """
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            kv_scale = _map_kv_scale_name(name)
            if kv_scale is not None:
                self._load_kv_scale(*kv_scale, tensor)
                continue
            target, shard = _map_hf_name(name)
            if target is None:
                continue
            if target == "lm_head.weight" and self.tie_word_embeddings:
                continue
            if not is_stage_param(target, self.pp_group, (self.start_layer, self.end_layer), self.holds_embedding):
                continue  # another pipeline stage's
            if target not in params:
                if target.endswith(".bias") and isinstance(tensor, torch.Tensor) and not tensor.any():
                    continue  # GPTQ checkpoints save a zero bias for every layer, biased or not
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
            if self.gemma_norms and target.endswith("norm.weight"):
                tensor = tensor + 1.0  # Gemma's RMSNorm multiplies by (1 + weight)
            load_param(self, params, name, target, tensor, shard, loaded)
        raise_if_missing(params, loaded)


    def _load_kv_scale(self, attention: str, which: str, tensor) -> None:
        """An fp8 KV cache's per-tensor scale of one layer (`attention/kv_quant.py`); kept whatever the cache
        dtype, and applied only to an fp8 cache (`kv_quant.effective_scales`). A layer of another pipeline
        stage has no attention here."""
        try:
            impl = self.get_submodule(attention).attn
        except AttributeError:
            return
        value = float(tensor.float().max()) if isinstance(tensor, torch.Tensor) else float(tensor)
        if not value > 0 or value == float("inf"):
            raise ValueError(f"checkpoint KV-cache scale of {attention!r} must be positive and finite, got {value}")
        for part in which:  # "k", "v" or, for the old single kv_scale, both
            setattr(impl, f"{part}_scale", value)


def _map_kv_scale_name(name: str) -> tuple[str, str] | None:
    """'model.layers.3.self_attn.k_scale' (vLLM's name; compressed-tensors saves
    'self_attn.k_proj.output_scale'; older checkpoints one 'self_attn.kv_scale') ->
    ('layers.3.self_attn', 'k')."""
    name = name.removeprefix("model.")
    for suffix, which in ((".k_scale", "k"), (".v_scale", "v"), (".k_proj.output_scale", "k"),
                          (".v_proj.output_scale", "v"), (".kv_scale", "kv")):
        if name.endswith(suffix) and ".self_attn" in name:
            return name[: -len(suffix)].removesuffix(".attn"), which
    return None


_FUSED = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


def _map_hf_name(name: str) -> tuple[str | None, str | int | tuple[str, int | None] | None]:
    """'model.layers.3.self_attn.k_proj.bias' -> ('layers.3.self_attn.qkv_proj.bias', 'k'); an expert's
    weight -> (its fused-MoE parameter, (shard, expert)) (`models/moe.py::map_expert_name`)."""
    if "rotary_emb" in name or name.endswith(".weight_shape"):  # compressed-tensors' unpacked shape: known here
        return None, None
    if name.startswith("model."):
        name = name[len("model.") :]
    name = name.replace(".block_sparse_moe.", ".mlp.")  # Mixtral's name for its MoE block
    expert = map_expert_name(name)
    if expert is not None:
        return expert
    parts = name.split(".")
    if len(parts) >= 2 and parts[-2] in _FUSED:
        fused, shard = _FUSED[parts[-2]]
        parts[-2] = fused
        return ".".join(parts), shard
    return name, None
