"""Tiny configs for the dense families with sliding windows, soft-capping or fused weights.

Each is built with transformers' own config class. The window is 24 tokens, so that prompts of a
few dozen tokens already run past it and its blocks (16 tokens) leave the window as they grow.
"""

from __future__ import annotations

SLIDING_WINDOW = 24


def make_config(family: str, common: dict):
    from transformers import Gemma2Config, Gemma3TextConfig, MistralConfig, Phi3Config

    if family == "mistral":
        return MistralConfig(sliding_window=SLIDING_WINDOW, **common)
    if family == "qwen2_sliding":  # Qwen2's upper layers local (layer 1 of 2)
        from transformers import Qwen2Config

        return Qwen2Config(use_sliding_window=True, sliding_window=SLIDING_WINDOW, max_window_layers=1, **common)
    if family == "phi3":
        return Phi3Config(pad_token_id=None, **common)
    if family == "phi3_partial":  # Phi-4-mini's layout: three quarters of each head rotate
        return Phi3Config(pad_token_id=None, partial_rotary_factor=0.75, **common)
    if family == "phi3_longrope":
        # A short original context (64) under a longer one (512): LongRoPE's long factors apply to
        # sequences past 64 tokens, its short ones below.
        half = 64 // common["num_attention_heads"] // 2
        rope = dict(rope_type="longrope", rope_theta=10000.0, original_max_position_embeddings=64,
                    short_factor=[1.0 + 0.1 * i for i in range(half)],
                    long_factor=[1.5 + 0.4 * i for i in range(half)])
        return Phi3Config(pad_token_id=None, rope_parameters=rope, original_max_position_embeddings=64, **common)
    if family == "gemma2":
        # Soft-capping low enough to bend the tiny model's scores and logits.
        return Gemma2Config(head_dim=16, query_pre_attn_scalar=24, sliding_window=SLIDING_WINDOW,
                            attn_logit_softcapping=5.0, final_logit_softcapping=8.0, pad_token_id=None,
                            hidden_activation="gelu_pytorch_tanh",
                            **{**common, "num_hidden_layers": 4, "tie_word_embeddings": True})
    if family == "gemma3":
        # Layers 0-2 local (base 10k), layer 3 global (base 1M, linear scaling).
        rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 4.0}}
        return Gemma3TextConfig(head_dim=16, query_pre_attn_scalar=24, sliding_window=SLIDING_WINDOW,
                                layer_types=["sliding_attention"] * 3 + ["full_attention"], rope_parameters=rope,
                                pad_token_id=None, **{**common, "num_hidden_layers": 4})
    raise ValueError(family)


def perturb(family: str, model) -> None:
    """Gemma initialises its norms to zero (a scale of 1 + 0): random ones make the offset matter."""
    import torch

    if family.startswith("gemma"):
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.normal_(0, 0.3)
