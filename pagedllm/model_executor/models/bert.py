"""BERT encoders: `BertModel` (embedding models such as all-MiniLM-L6-v2) and
`BertForSequenceClassification` (cross-encoder rerankers), as in the original paper.

An encoder runs each prompt once, whole, with bidirectional attention
(`attention/encoder_attention.py`) and keeps no KV cache; the model runner pools its final
hidden states (`layers/pooler.py`). Unlike the decoder, BERT adds learned absolute position and
token-type (segment) embeddings to the token embeddings, normalises after each residual add
(post-LN) and uses a GELU MLP. Q, K and V are loaded into one fused matrix, as in the decoder.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn
from transformers.activations import ACT2FN

from pagedllm.attention.encoder_attention import EncoderAttentionMetadata, encoder_attention
from pagedllm.model_executor.layers.build_context import BuildContext
from pagedllm.model_executor.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear, copy_weight
from pagedllm.model_executor.weight_utils import raise_if_missing


class BertEmbeddings(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        if getattr(config, "position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"BERT with {config.position_embedding_type!r} position embeddings is not supported")

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                token_type_ids: Optional[torch.Tensor]) -> torch.Tensor:
        hidden = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        if token_type_ids is None:
            hidden = hidden + self.token_type_embeddings.weight[0]
        else:
            hidden = hidden + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(hidden)


class BertLayer(nn.Module):
    def __init__(self, config, ctx: BuildContext) -> None:
        super().__init__()
        method, hidden = ctx.linear_methods.linear, config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = hidden // self.num_heads
        self.qkv_proj = QKVParallelLinear(hidden, self.head_dim, self.num_heads, self.num_heads, bias=True,
                                          linear_method=method)
        self.attn_out = RowParallelLinear(hidden, hidden, bias=True, linear_method=method)
        self.attn_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.intermediate = ColumnParallelLinear(hidden, config.intermediate_size, bias=True, linear_method=method)
        self.act = ACT2FN[config.hidden_act]
        self.output = RowParallelLinear(config.intermediate_size, hidden, bias=True, linear_method=method)
        self.output_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)

    def forward(self, hidden: torch.Tensor, meta: EncoderAttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).view(-1, 3 * self.num_heads, self.head_dim).chunk(3, dim=1)
        attn = encoder_attention(q, k, v, meta, self.head_dim**-0.5)
        hidden = self.attn_norm(self.attn_out(attn) + hidden)
        return self.output_norm(self.output(self.act(self.intermediate(hidden))) + hidden)


class BertModel(nn.Module):
    """Token ids of whole prompts in, final hidden states out (one row per token)."""

    is_encoder_only = True

    def __init__(self, config, architecture: str, ctx: BuildContext) -> None:
        super().__init__()
        if ctx.tp_group.world_size != 1:
            raise ValueError("BERT models run on one device (tensor_parallel_size=1)")
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList(BertLayer(config, ctx) for _ in range(config.num_hidden_layers))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list, meta: EncoderAttentionMetadata,
                token_type_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        hidden = self.embeddings(input_ids, positions, token_type_ids)
        for layer in self.layers:
            hidden = layer(hidden, meta)
        return hidden

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        _load(self, ((n.removeprefix("bert."), t) for n, t in weights if not n.removeprefix("bert.").startswith("pooler.")))


class BertForSequenceClassification(nn.Module):
    """BERT plus its classification head: the [CLS] state through `pooler` (dense + tanh), then
    `classifier` to one logit per label. With one label it is a cross-encoder: its logit, through a
    sigmoid, is the relevance of the (query, document) pair it was given as two segments."""

    is_encoder_only = True

    def __init__(self, config, architecture: str, ctx: BuildContext) -> None:
        super().__init__()
        self.bert = BertModel(config, "BertModel", ctx)
        self.pooler_dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.num_labels = config.num_labels

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list, meta: EncoderAttentionMetadata,
                token_type_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.bert(input_ids, positions, kv_caches, meta, token_type_ids)

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        """The head, on the pooled ([CLS]) states: one logit per label."""
        return self.classifier(torch.tanh(self.pooler_dense(pooled)))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        _load(self, ((n.replace("bert.pooler.dense.", "pooler_dense."), t) for n, t in weights))


# Hugging Face's names inside one encoder layer -> ours (q/k/v go into one fused matrix).
_LAYER_NAMES = {
    "attention.self.query": ("qkv_proj", "q"),
    "attention.self.key": ("qkv_proj", "k"),
    "attention.self.value": ("qkv_proj", "v"),
    "attention.output.dense": ("attn_out", None),
    "attention.output.LayerNorm": ("attn_norm", None),
    "intermediate.dense": ("intermediate", None),
    "output.dense": ("output", None),
    "output.LayerNorm": ("output_norm", None),
}


def _map_name(name: str) -> tuple[str, Optional[str]]:
    """'encoder.layer.3.attention.self.key.bias' -> ('layers.3.qkv_proj.bias', 'k'); with any prefix kept."""
    prefix, sep, rest = name.partition("encoder.layer.")
    if not sep:
        return name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias"), None
    index, _, inner = rest.partition(".")
    module, _, param = inner.rpartition(".")
    param = {"gamma": "weight", "beta": "bias"}.get(param, param)
    if module not in _LAYER_NAMES:
        raise ValueError(f"checkpoint tensor {name!r} has no place in this model")
    target, shard = _LAYER_NAMES[module]
    return f"{prefix}layers.{index}.{target}.{param}", shard


def _load(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for name, tensor in weights:
        if name.endswith("position_ids"):  # a buffer some checkpoints carry
            continue
        target, shard = _map_name(name)
        if target not in params:
            raise ValueError(f"checkpoint tensor {name!r} has no place in this model")
        module = model.get_submodule(target.rpartition(".")[0])
        with torch.no_grad():
            if shard is not None:
                module.weight_loader(params[target], tensor, shard)
            else:
                copy_weight(params[target], tensor)
        loaded.add(target if shard is None else f"{target}:{shard}")
    raise_if_missing(params, loaded)
