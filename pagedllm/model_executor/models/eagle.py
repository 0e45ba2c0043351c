"""An EAGLE-1 head: one Llama decoder layer that drafts from the target model's hidden states.

EAGLE (Li et al., 2024) predicts the target's next hidden state rather than its next token: at position p
the head takes the target's final hidden state h_p (after the final norm, what the target's LM head reads)
and the embedding of the token at p + 1, projects their concatenation back to the hidden size (`fc`), runs
one decoder layer over it (attending to its own K/V of earlier positions) and reads the result with the
target's LM head, guessing the token at p + 2. Its output hidden state then stands in for the target's
next one, so it can guess again from its own guess.

The layout is the one vLLM loads (`EagleLlamaForCausalLM`) from EAGLE-1 checkpoints such as
yuhuili/EAGLE-LLaMA3-Instruct-8B: `fc.weight` [hidden, 2 * hidden] (embedding first, then h) with an
optional `fc.bias`, `layers.0.*` as a Llama decoder layer whose `input_layernorm` is skipped (the layer's
input is `fc`'s output as it is; a checkpoint that still ships that norm has it ignored), no final norm
before the LM head, and `embed_tokens` / `lm_head` shared with the target when the checkpoint has none
(or holds a copy equal to the target's). Later layers, if a head has more than one, are plain Llama layers.
"""

from __future__ import annotations

import glob
import os
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from pagedllm.attention.backend import KVCache
from pagedllm.logger import init_logger
from pagedllm.model_executor.layers.build_context import BuildContext
from pagedllm.model_executor.layers.linear import ReplicatedLinear
from pagedllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from pagedllm.model_executor.models.decoder import DecoderLayer, _map_hf_name, arch_flags
from pagedllm.model_executor.weight_utils import load_param, raise_if_missing

logger = init_logger(__name__)


class EagleHead(nn.Module):
    """`forward(input_ids, positions, hidden_states, ...)` -> the head's hidden states (what it feeds back
    to itself); `compute_logits` reads them with the head's LM head (the target's unless it has its own)."""

    def __init__(self, config: Any, ctx: BuildContext, fc_bias: bool, own_embedding: bool, own_lm_head: bool
                 ) -> None:
        super().__init__()
        hidden = config.hidden_size
        flags = arch_flags("LlamaForCausalLM", config)
        self.config = config
        self.fc = ReplicatedLinear(2 * hidden, hidden, bias=fc_bias, linear_method=ctx.linear_methods.linear)
        self.layers = nn.ModuleList(DecoderLayer(config, flags, ctx, i) for i in range(config.num_hidden_layers))
        self.layers[0].input_layernorm = nn.Identity()  # EAGLE-1: fc's output enters the first layer as it is
        if own_embedding:
            self.embed_tokens = VocabParallelEmbedding(config.vocab_size, hidden, ctx.tp_group,
                                                       logits_method=ctx.linear_methods.embedding)
        if own_lm_head:
            self.lm_head = ParallelLMHead(config.vocab_size, hidden, ctx.tp_group,
                                          logits_method=ctx.linear_methods.lm_head)
        self.shared_logits = None  # the target's compute_logits, when the head has no LM head of its own

    def share_with(self, target: nn.Module) -> None:
        """Read tokens and logits through the target's embedding and LM head where the head has none of its
        own, or has a copy equal to the target's (the copy is then dropped: it would only cost memory)."""
        target_embed = target.embed_tokens
        own = getattr(self, "embed_tokens", None)
        if own is not None and _same_plain_weight(own, target_embed):
            del self.embed_tokens
            own = None
        if own is None:
            object.__setattr__(self, "embed_tokens", target_embed)  # not a submodule: the target owns it
        own_head = getattr(self, "lm_head", None)
        target_head = getattr(target, "lm_head", None)
        if own_head is not None and target_head is not None and _same_plain_weight(own_head, target_head):
            del self.lm_head
            own_head = None
        if own_head is None:
            self.shared_logits = target.compute_logits

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, hidden_states: torch.Tensor,
                kv_caches: list[KVCache], meta: Any) -> torch.Tensor:
        embeds = self.embed_tokens(input_ids)
        hidden = self.fc(torch.cat((embeds, hidden_states.to(embeds.dtype)), dim=-1))
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(positions, hidden, residual, kv_cache, meta)
        return hidden + residual  # no final norm: the LM head reads the sum as EAGLE trained it

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.shared_logits is not None:
            return self.shared_logits(hidden)
        return self.lm_head.compute_logits(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            target, shard = _map_hf_name(name)
            if target is None or target == "layers.0.input_layernorm.weight":
                continue  # EAGLE-1 skips the first layer's input norm (some checkpoints still ship it)
            if target not in params:
                raise ValueError(f"EAGLE head tensor {name!r} has no place in an EAGLE-1 Llama head")
            load_param(self, params, name, target, tensor, shard, loaded, what="EAGLE head")
        raise_if_missing(params, loaded, what="EAGLE head checkpoint")


def _same_plain_weight(a: nn.Module, b: nn.Module) -> bool:
    wa, wb = getattr(a, "weight", None), getattr(b, "weight", None)
    return (isinstance(wa, torch.Tensor) and isinstance(wb, torch.Tensor) and wa.shape == wb.shape
            and wa.dtype == wb.dtype and torch.equal(wa, wb))


def head_weight_files(path: str) -> list[str]:
    """The head's weight files: safetensors if any, else PyTorch pickles (EAGLE-1's `pytorch_model.bin`)."""
    files = sorted(glob.glob(os.path.join(path, "*.safetensors"))) or sorted(glob.glob(os.path.join(path, "*.bin")))
    if not files:
        raise ValueError(f"no *.safetensors or *.bin weights found in EAGLE head {path}")
    return files


def head_tensor_names(path: str) -> set[str]:
    """Every tensor name in the head's checkpoint (the names say which optional parts it has)."""
    names: set[str] = set()
    for file in head_weight_files(path):
        if file.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(file, framework="pt") as f:
                names.update(f.keys())
        else:
            names.update(torch.load(file, map_location="cpu", weights_only=True).keys())
    return {name.removeprefix("model.") for name in names}


def iterate_head_weights(path: str, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    for file in head_weight_files(path):
        if file.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name).to(dtype)
        else:
            for name, tensor in torch.load(file, map_location="cpu", weights_only=True).items():
                yield name, tensor.to(dtype)


def load_eagle_head(path: str, config: Any, dtype: torch.dtype, device: torch.device, ctx: BuildContext,
                    target: nn.Module) -> EagleHead:
    """Build the head on the meta device, fill it from `path`, and share what it lacks with `target`."""
    from pagedllm.model_executor.model_loader import build_empty, process_weights_after_loading

    names = head_tensor_names(path)
    head = build_empty(lambda: EagleHead(config, ctx, fc_bias="fc.bias" in names,
                                         own_embedding="embed_tokens.weight" in names,
                                         own_lm_head="lm_head.weight" in names), dtype, device)
    head.load_weights(iterate_head_weights(path, dtype))
    head.eval().requires_grad_(False)
    head.share_with(target)  # before processing: compares the checkpoint's plain copies with the target's
    process_weights_after_loading(head)
    logger.info("Loaded EAGLE head %s (%d decoder layer(s), %s embedding, %s LM head)", path,
                config.num_hidden_layers, "own" if "embed_tokens" in head._modules else "the target's",
                "own" if head.shared_logits is None else "the target's")
    return head


# What vLLM accepts for an EAGLE-1 Llama head: the Llama architecture (vLLM renames it EagleLlamaForCausalLM
# when method="eagle"), that name itself, EAGLE's own "LlamaForCausalLMEagle", and vLLM's older nested
# `{"model_type": "eagle", "model": {...}}` config ("EAGLEModel").
EAGLE_ARCHITECTURES = ("LlamaForCausalLM", "EagleLlamaForCausalLM", "LlamaForCausalLMEagle", "EAGLEModel")


def load_eagle_config(path: str, target_config: Any) -> Any:
    """The head's Llama config from `path`/config.json, or a ValueError saying why this head cannot draft
    for `target_config`: an EAGLE-3 head, a head of another family, or one whose hidden size or vocabulary
    is not the target's (the head reads the target's hidden states and shares its embedding and LM head)."""
    import json

    from transformers import LlamaConfig

    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise ValueError(f"speculative_config model {path!r} is not an EAGLE head checkpoint directory "
                         "(no config.json)")
    with open(file) as f:
        raw = json.load(f)
    if raw.get("model_type") == "eagle":  # vLLM's EAGLEConfig: the head's own config nested under "model"
        if not isinstance(raw.get("model"), dict):
            raise ValueError(f"EAGLE head {path!r}: model_type 'eagle' needs the head's config under 'model'")
        raw = {**raw["model"], **{k: v for k, v in raw.items() if k not in ("model", "model_type", "architectures")}}
    archs = list(raw.get("architectures") or ["LlamaForCausalLM"])
    if (any("eagle3" in a.lower() for a in archs) or "eagle_config" in raw or "target_hidden_size" in raw
            or raw.get("draft_vocab_size", raw.get("vocab_size")) != raw.get("vocab_size")):
        raise ValueError(f"EAGLE head {path!r} is an EAGLE-3 head (architectures {archs}); pagedllm runs EAGLE-1 "
                         "heads only (method 'eagle3' is not supported yet)")
    if raw.get("model_type", "llama") != "llama" or not any(a in EAGLE_ARCHITECTURES for a in archs):
        raise ValueError(f"EAGLE head {path!r} has architectures {archs} (model_type {raw.get('model_type')!r}); "
                         f"pagedllm runs EAGLE-1 heads of Llama layers: {list(EAGLE_ARCHITECTURES)}")
    config = LlamaConfig.from_dict({**raw, "architectures": ["EagleLlamaForCausalLM"]})
    if config.num_hidden_layers < 1:
        raise ValueError(f"EAGLE head {path!r} has num_hidden_layers={config.num_hidden_layers}: it needs at least "
                         "one decoder layer")
    target_hidden = target_config.hidden_size
    if config.hidden_size != target_hidden:
        raise ValueError(f"EAGLE head {path!r} has hidden size {config.hidden_size}, the target {target_hidden}: "
                         "an EAGLE-1 head reads the target's hidden states, so they must match")
    if config.vocab_size != target_config.vocab_size:
        raise ValueError(f"EAGLE head {path!r} has a vocabulary of {config.vocab_size} tokens, the target "
                         f"{target_config.vocab_size}: the head shares the target's tokenizer")
    return config
