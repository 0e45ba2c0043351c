"""Top-k routing: which experts each token goes to, and with what weights.

Mixtral, Qwen2-MoE and Qwen3-MoE all route the same way: a softmax over the router's logits (in
float32, as transformers does), the `top_k` largest probabilities, and, where the family says so
(`renormalize`: always for Mixtral, `norm_topk_prob` for Qwen), those k weights divided by their
sum. vLLM calls this `fused_topk`; the name is kept though here it is three plain torch ops.
"""

from __future__ import annotations

import torch


def fused_topk(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """([tokens, top_k] float32 weights, [tokens, top_k] int64 expert ids), best expert first."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    topk_weights, topk_ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    return topk_weights, topk_ids
