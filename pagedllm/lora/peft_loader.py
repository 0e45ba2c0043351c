"""Read a PEFT LoRA adapter (`adapter_config.json` + `adapter_model.safetensors`) and check it
against the base model before any of it reaches a worker.

PEFT's LoRA adds `scaling * B (A x)` to a linear layer's output, with A [r, in], B [out, r] and
`scaling = lora_alpha / r` (`lora_alpha / sqrt(r)` with rsLoRA). The adapter is kept here as the
full, unsharded A and B of each (layer, projection) with the scaling apart; a worker slices its
tensor-parallel share when it copies them into its slots (`lora/model_manager.py`). Everything a
bad adapter can get wrong (a target this engine cannot wrap, a rank above `max_lora_rank`, shapes
of another model, a missing or corrupt file) is a `ValueError` naming it, so the server answers 400
and keeps serving.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any

import torch

# The Hugging Face projections of a decoder layer that LoRA can wrap here.
SUPPORTED_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight$")


@dataclass
class LoRAAdapter:
    """One adapter's weights on the CPU, unsharded: (layer index, projection) -> (A [r, in], B [out, r])."""

    rank: int
    scaling: float
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]

    def num_bytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.weights.values())


def projection_shapes(hf_config: Any) -> dict[str, tuple[int, int]]:
    """(out, in) of each supported projection of the base model, from its config."""
    hidden = hf_config.hidden_size
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    head_dim = getattr(hf_config, "head_dim", None) or hidden // heads
    inter = hf_config.intermediate_size
    return {
        "q_proj": (heads * head_dim, hidden), "k_proj": (kv_heads * head_dim, hidden),
        "v_proj": (kv_heads * head_dim, hidden), "o_proj": (hidden, heads * head_dim),
        "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter),
    }


def read_adapter_config(path: str) -> dict:
    """`adapter_config.json`, checked for what this engine supports."""
    if not os.path.isdir(path):
        raise ValueError(f"LoRA adapter path {path!r} is not a folder")
    config_file = os.path.join(path, "adapter_config.json")
    try:
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"LoRA adapter {path!r} has no adapter_config.json (not a PEFT adapter)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"LoRA adapter {path!r}: adapter_config.json is unreadable: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"LoRA adapter {path!r}: adapter_config.json is not a JSON object")
    peft_type = config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise ValueError(f"LoRA adapter {path!r}: peft_type {peft_type!r} is not LORA")
    refused = {
        "use_dora": "DoRA", "modules_to_save": "modules_to_save (fully trained extra modules)",
        "rank_pattern": "per-module ranks (rank_pattern)", "alpha_pattern": "per-module alphas (alpha_pattern)",
        "fan_in_fan_out": "fan_in_fan_out weights",
    }
    for key, what in refused.items():
        if config.get(key):
            raise ValueError(f"LoRA adapter {path!r}: {what} is not supported")
    if config.get("bias", "none") != "none":
        raise ValueError(f"LoRA adapter {path!r}: bias={config['bias']!r} is not supported (only 'none')")
    targets = config.get("target_modules")
    if isinstance(targets, list):  # (a string is a regular expression: the tensors are checked instead)
        unsupported = [t for t in targets if t.rpartition(".")[2] not in SUPPORTED_TARGETS]
        if unsupported:
            raise ValueError(f"LoRA adapter {path!r}: target module {unsupported[0]!r} is not supported "
                             f"(supported: {', '.join(SUPPORTED_TARGETS)})")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or r < 1 or not isinstance(alpha, (int, float)):
        raise ValueError(f"LoRA adapter {path!r}: r ({r!r}) and lora_alpha ({alpha!r}) must be numbers, r >= 1")
    return config


def load_peft_adapter(path: str, hf_config: Any, max_lora_rank: int) -> LoRAAdapter:
    """The adapter at `path`, checked against the base model's shapes and `max_lora_rank`."""
    config = read_adapter_config(path)
    rank = config["r"]
    if rank > max_lora_rank:
        raise ValueError(f"LoRA adapter {path!r} has rank {rank}, above max_lora_rank={max_lora_rank}; start the "
                         "engine with a larger max_lora_rank")
    scaling = config["lora_alpha"] / (math.sqrt(rank) if config.get("use_rslora") else rank)
    tensors = _read_tensors(path)
    shapes = projection_shapes(hf_config)
    num_layers = hf_config.num_hidden_layers
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.search(key)
        if match is None:
            raise ValueError(f"LoRA adapter {path!r}: tensor {key!r} targets a module pagedllm cannot wrap "
                             f"(supported: {', '.join(SUPPORTED_TARGETS)} of the decoder layers)")
        layer, target, half = int(match.group(1)), match.group(2), match.group(3)
        if target not in SUPPORTED_TARGETS:
            raise ValueError(f"LoRA adapter {path!r}: target module {target!r} is not supported "
                             f"(supported: {', '.join(SUPPORTED_TARGETS)})")
        if layer >= num_layers:
            raise ValueError(f"LoRA adapter {path!r}: tensor {key!r} is for layer {layer}, but the base model has "
                             f"{num_layers} layers")
        halves.setdefault((layer, target), {})[half] = tensor
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for (layer, target), pair in sorted(halves.items()):
        if set(pair) != {"A", "B"}:
            raise ValueError(f"LoRA adapter {path!r}: layer {layer} {target} has lora_{next(iter(pair))} without "
                             f"its other half")
        out_features, in_features = shapes[target]
        a, b = pair["A"], pair["B"]
        if tuple(a.shape) != (rank, in_features) or tuple(b.shape) != (out_features, rank):
            raise ValueError(f"LoRA adapter {path!r}: layer {layer} {target} has A {tuple(a.shape)} and B "
                             f"{tuple(b.shape)}; this base model and r={rank} need A {(rank, in_features)} and "
                             f"B {(out_features, rank)} (an adapter of another model?)")
        weights[(layer, target)] = (a.float().contiguous(), b.float().contiguous())
    if not weights:
        raise ValueError(f"LoRA adapter {path!r} holds no LoRA weights")
    return LoRAAdapter(rank=rank, scaling=float(scaling), weights=weights)


def _read_tensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(file):
        raise ValueError(f"LoRA adapter {path!r} has no adapter_model.safetensors (only safetensors are read)")
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"LoRA adapter {path!r}: adapter_model.safetensors is corrupt: {e}") from None
