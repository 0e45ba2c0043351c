"""LLaVA: a CLIP vision tower and a two-layer projector in front of a decoder-only language model.

The vision tower runs once per image (in the model runner, `embed_images`); its patch features, taken
from `vision_feature_layer` (the second-to-last layer in LLaVA-1.5) and projected to the language
model's width, replace the rows of the image's placeholder tokens (`multimodal/processing.py`) in the
language model's input embeddings. From there on it is the shared decoder (`models/decoder.py`), with
its paged KV cache, prefix caching and chunked prefill: positions are ordinary 1-D positions.

The tower is written out here (patch embedding, class token, learned positions, pre-norm encoder
layers with quick-GELU MLPs) rather than borrowed from transformers, so it reads like the paper and
runs only the layers the feature layer needs.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from pagedllm.attention.backend import KVCache
from pagedllm.model_executor.layers.build_context import BuildContext
from pagedllm.model_executor.layers.linear import copy_weight
from pagedllm.model_executor.models.decoder import DecoderForCausalLM


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        width = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.layer_norm1 = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(width, width) for _ in range(3))
        self.out_proj = nn.Linear(width, width)
        self.layer_norm2 = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.fc1 = nn.Linear(width, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, width)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        h = self.layer_norm1(x)
        q, k, v = (proj(h).view(batch, length, self.num_heads, -1).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        attn = F.scaled_dot_product_attention(q, k, v)  # bidirectional over the image's patches
        x = x + self.out_proj(attn.transpose(1, 2).reshape(batch, length, width))
        return x + self.fc2(self.act(self.fc1(self.layer_norm2(x))))


class CLIPVisionTower(nn.Module):
    """CLIP's vision transformer up to the layer whose output LLaVA reads (`num_layers` of them)."""

    def __init__(self, config: Any, num_layers: int) -> None:
        super().__init__()
        width, patch = config.hidden_size, config.patch_size
        self.num_positions = (config.image_size // patch) ** 2 + 1
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.patch_embedding = nn.Conv2d(config.num_channels, width, kernel_size=patch, stride=patch, bias=False)
        self.position_embedding = nn.Embedding(self.num_positions, width)
        self.pre_layrnorm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(num_layers))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # [images, patches, width]
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        x = torch.cat([cls, patches], dim=1) + self.position_embedding.weight[: self.num_positions]
        x = self.pre_layrnorm(x)
        for layer in self.layers:
            x = layer(x)
        return x


class LlavaMultiModalProjector(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        bias = getattr(config, "multimodal_projector_bias", True)
        self.linear_1 = nn.Linear(config.vision_config.hidden_size, config.text_config.hidden_size, bias=bias)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(config.text_config.hidden_size, config.text_config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


# The decoder families a LLaVA checkpoint's language model may be, by its config's model_type.
LANGUAGE_MODELS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def language_model_architecture(text_config: Any) -> str:
    architecture = LANGUAGE_MODELS.get(getattr(text_config, "model_type", None))
    if architecture is None:
        raise ValueError(f"LLaVA with a {text_config.model_type!r} language model is not supported "
                         f"({sorted(LANGUAGE_MODELS)} are)")
    return architecture


def vision_layers_needed(config: Any) -> int:
    """How many encoder layers produce `vision_feature_layer` (hidden state 0 is the embeddings)."""
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(f"vision_feature_layer {layer!r}: only a single layer is supported")
    total = config.vision_config.num_hidden_layers
    index = layer if layer >= 0 else total + 1 + layer
    if not 0 <= index <= total:
        raise ValueError(f"vision_feature_layer {layer} is outside the tower's {total} layers")
    return index


class LlavaForConditionalGeneration(nn.Module):
    """`embed_images` for the model runner; `forward`/`compute_logits` are the language model's."""

    def __init__(self, config: Any, architecture: str, ctx: BuildContext) -> None:
        super().__init__()
        if config.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy {config.vision_feature_select_strategy!r} is not "
                             "supported ('default' or 'full')")
        self.config = config
        self.keep_class_token = config.vision_feature_select_strategy == "full"
        self.vision_tower = CLIPVisionTower(config.vision_config, vision_layers_needed(config))
        self.multi_modal_projector = LlavaMultiModalProjector(config)
        text_config = config.text_config
        self.language_model = DecoderForCausalLM(text_config, language_model_architecture(text_config), ctx)

    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[images, 3, H, W] -> [images, tokens per image, text hidden size]."""
        features = self.vision_tower(pixel_values.to(self.vision_tower.class_embedding.dtype))
        if not self.keep_class_token:
            features = features[:, 1:]
        return self.multi_modal_projector(features)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache], meta: Any,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return self.language_model(input_ids, positions, kv_caches, meta, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.compute_logits(hidden)

    # ----- weights ----------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Route each checkpoint tensor: the language model's to it (in the names it knows), the tower's
        and the projector's here. Both checkpoint layouts are read: llava-hf's (`language_model.model.…`,
        `vision_tower.vision_model.…`) and transformers 5's (`model.language_model.…`, `lm_head`)."""
        own = dict(self.named_parameters())
        loaded: set[str] = set()
        self.language_model.load_weights(self._route(weights, own, loaded))
        missing = [n for n in own if not n.startswith("language_model.") and n not in loaded]
        if missing:
            raise ValueError(f"checkpoint is missing weights, e.g. {missing[:3]}")

    def _route(self, weights: Iterable[tuple[str, torch.Tensor]], own: dict[str, nn.Parameter],
               loaded: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            name = name.removeprefix("model.") if name.startswith("model.") else name
            if name.startswith("language_model."):
                rest = name.removeprefix("language_model.")
                yield (rest if rest.startswith(("model.", "lm_head.")) else "model." + rest), tensor
                continue
            if name.startswith("lm_head."):
                yield name, tensor
                continue
            target = name.replace("vision_tower.vision_model.", "vision_tower.")
            target = target.replace("vision_tower.embeddings.", "vision_tower.")
            target = target.replace("vision_tower.encoder.layers.", "vision_tower.layers.")
            target = target.replace(".self_attn.", ".").replace(".mlp.", ".")
            if target.startswith("vision_tower.post_layernorm.") or target not in own:
                if target.startswith("vision_tower.") and (target.startswith("vision_tower.post_layernorm.")
                                                           or _layer_index(target) >= len(self.vision_tower.layers)):
                    continue  # a layer past the feature layer, or the pooled output's norm: never used
                if target.endswith("position_ids"):
                    continue
                raise ValueError(f"checkpoint tensor {name!r} has no place in this model")
            with torch.no_grad():
                copy_weight(own[target], tensor)
            loaded.add(target)


def _layer_index(name: str) -> int:
    parts = name.split(".")
    return int(parts[2]) if len(parts) > 2 and parts[1] == "layers" and parts[2].isdigit() else -1
