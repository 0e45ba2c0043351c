"""Tiny EAGLE-1 heads for conftest's tiny Llama targets, and a plain PyTorch reference of the head's forward.

A head is written the way EAGLE-1 checkpoints are: a Llama config.json and a safetensors file with
`fc.weight` [hidden, 2 * hidden], `layers.0.*` without `input_layernorm`, and `embed_tokens.weight` only
when asked (otherwise the target's is shared), never `lm_head.weight`.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file


def build_eagle_head(path: str, target_dir: str, seed: int = 0, fc_bias: bool = False,
                     embed_tokens: torch.Tensor | None = None, zero_layer: bool = False,
                     fc: torch.Tensor | None = None) -> str:
    """A random head (weights ~ N(0, 0.3), like conftest's targets) for the Llama at `target_dir`.
    `embed_tokens`: the head's own embedding; `zero_layer`: the decoder layer adds nothing (attention and
    MLP outputs zeroed); `fc`: the projection's weight."""
    with open(os.path.join(target_dir, "config.json")) as f:
        target = json.load(f)
    rope_theta = target.get("rope_theta") or (target.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    hidden, inter = target["hidden_size"], target["intermediate_size"]
    heads, kv_heads = target["num_attention_heads"], target["num_key_value_heads"]
    head_dim = hidden // heads
    config = {k: target[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                                     "num_key_value_heads", "max_position_embeddings", "rms_norm_eps",
                                     "bos_token_id", "eos_token_id", "hidden_act") if k in target}
    config.update(architectures=["LlamaForCausalLM"], model_type="llama", num_hidden_layers=1,
                  rope_theta=rope_theta, torch_dtype="float32", bias=fc_bias)
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.3

    tensors = {
        "fc.weight": rand(hidden, 2 * hidden) if fc is None else fc,
        "layers.0.self_attn.q_proj.weight": rand(heads * head_dim, hidden),
        "layers.0.self_attn.k_proj.weight": rand(kv_heads * head_dim, hidden),
        "layers.0.self_attn.v_proj.weight": rand(kv_heads * head_dim, hidden),
        "layers.0.self_attn.o_proj.weight": rand(hidden, heads * head_dim),
        "layers.0.mlp.gate_proj.weight": rand(inter, hidden),
        "layers.0.mlp.up_proj.weight": rand(inter, hidden),
        "layers.0.mlp.down_proj.weight": rand(hidden, inter),
        "layers.0.post_attention_layernorm.weight": 1 + rand(hidden),
    }
    if fc_bias:
        tensors["fc.bias"] = rand(hidden)
    if zero_layer:
        tensors["layers.0.self_attn.o_proj.weight"].zero_()
        tensors["layers.0.mlp.down_proj.weight"].zero_()
    if embed_tokens is not None:
        tensors["embed_tokens.weight"] = embed_tokens
    os.makedirs(path, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return path


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Llama's rotary embedding (rotate_half form) on [tokens, heads, head_dim]."""
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    angles = positions[:, None].float() * inv_freq[None]
    cos, sin = torch.cat((angles, angles), -1).cos()[:, None], torch.cat((angles, angles), -1).sin()[:, None]
    rotated = torch.cat((-x[..., d // 2:], x[..., : d // 2]), -1)
    return x * cos + rotated * sin


def reference_eagle_forward(head_dir: str, token_ids: list[int], target_hidden: torch.Tensor,
                            target_embedding: torch.Tensor) -> torch.Tensor:
    """The head's output hidden states over one sequence, written out from EAGLE-1's definition: row p is
    fc(cat(embedding(token_ids[p]), target_hidden[p])) through one causal Llama layer without its input
    norm, plus the residual (no final norm). `token_ids[p]` is the token at p + 1 of the sequence."""
    with open(os.path.join(head_dir, "config.json")) as f:
        config = json.load(f)
    w = load_file(os.path.join(head_dir, "model.safetensors"))
    emb = w.get("embed_tokens.weight", target_embedding)[torch.tensor(token_ids)]
    x = torch.cat((emb, target_hidden), -1) @ w["fc.weight"].T
    if "fc.bias" in w:
        x = x + w["fc.bias"]
    n, hidden = x.shape
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    d = hidden // heads
    pos = torch.arange(n)
    q = _rope((x @ w["layers.0.self_attn.q_proj.weight"].T).view(n, heads, d), pos, config["rope_theta"])
    k = _rope((x @ w["layers.0.self_attn.k_proj.weight"].T).view(n, kv_heads, d), pos, config["rope_theta"])
    v = (x @ w["layers.0.self_attn.v_proj.weight"].T).view(n, kv_heads, d)
    k, v = k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / d**0.5
    scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(n, hidden)
    h = x + attn @ w["layers.0.self_attn.o_proj.weight"].T
    y = _rms_norm(h, w["layers.0.post_attention_layernorm.weight"], config.get("rms_norm_eps", 1e-6))
    mlp = (torch.nn.functional.silu(y @ w["layers.0.mlp.gate_proj.weight"].T) * (y @ w["layers.0.mlp.up_proj.weight"].T))
    return h + mlp @ w["layers.0.mlp.down_proj.weight"].T


def perfect_head(path: str, loopy: str) -> str:
    """For a target whose next token depends on the last token only (attention outputs zeroed, like
    test_spec_decode's `loopy`): the target's final hidden state after each token as the head's own
    embedding, fc = [I | 0], the layer zeroed. The head's logits are then the target's after the token it is
    given, so its greedy drafts are the target's greedy tokens."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(loopy, dtype=torch.float32).eval()
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    with torch.no_grad():
        after = model.model(input_ids=torch.arange(vocab)[:, None]).last_hidden_state[:, 0]
    fc = torch.cat((torch.eye(hidden), torch.zeros(hidden, hidden)), dim=1)
    return build_eagle_head(path, loopy, embed_tokens=after, zero_layer=True, fc=fc)
