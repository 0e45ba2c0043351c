"""Tiny random mixture-of-experts checkpoints, built with transformers' own config classes."""

from __future__ import annotations

import torch

from conftest import build_tokenizer

# Four experts, two per token: every expert is used by a handful of tokens, and tensor or expert
# parallelism over two ranks has two experts (or half of each expert) per rank.
MOE_FAMILIES = {
    # Mixtral: top-2 with the two weights renormalised to sum to 1.
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=96),
    # Qwen3-MoE without renormalisation (norm_topk_prob=False), and a dense layer (mlp_only_layers).
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, intermediate_size=128,
                      norm_topk_prob=False, mlp_only_layers=[1], head_dim=32),
    # Qwen2-MoE: renormalised, Q/K/V biases, and a shared expert scaled by its sigmoid gate.
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, intermediate_size=128,
                      norm_topk_prob=True, shared_expert_intermediate_size=96),
}


def build_moe_checkpoint(path: str, family: str, seed: int = 0, **overrides) -> str:
    from transformers import AutoModelForCausalLM, MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

    tokenizer = build_tokenizer(path)
    common = dict(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, initializer_range=0.3, tie_word_embeddings=False,
    )
    common.update(MOE_FAMILIES[family])
    common.update(overrides)
    config_cls = {"mixtral": MixtralConfig, "qwen3_moe": Qwen3MoeConfig, "qwen2_moe": Qwen2MoeConfig}[family]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config_cls(**common), dtype=torch.float32)
    if family == "qwen2_moe":  # make the Q/K/V biases matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.3)
    model.save_pretrained(path)
    return path
