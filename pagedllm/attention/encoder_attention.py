"""Bidirectional attention for encoder-only models (BERT), over a flattened batch of whole prompts.

An encoder runs each prompt once, all of it in one step, and every token attends to every token of
its own prompt; nothing is written to or read from a KV cache. The batch arrives flattened as the
runner lays out every step (prompt i owns the next `seq_lens[i]` rows, with no padding, so the
linear layers waste nothing); for the attention alone, the rows are scattered into a padded
[batch, heads, longest, head_dim] block with a key mask and run through one
`scaled_dot_product_attention` call, then gathered back. For the short prompts embedding models
see, attention is a small share of the FLOPs, so the padding there costs little.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class EncoderAttentionMetadata:
    """The prompts of one step: where each one's rows start and how many there are, and the index
    maps between the flattened rows and the padded block (built once per step, shared by all layers)."""

    seq_lens: list[int]
    max_seq_len: int
    padded_index: torch.Tensor  # [batch * max_seq_len] -> row of the flattened batch (pads read row 0)
    unpadded_index: torch.Tensor  # [num_tokens] -> position in the padded block
    key_mask: torch.Tensor  # bool [batch, 1, 1, max_seq_len], True where a key is a real token

    @classmethod
    def build(cls, seq_lens: list[int], device: torch.device) -> "EncoderAttentionMetadata":
        batch, longest = len(seq_lens), max(seq_lens)
        lens = torch.tensor(seq_lens, dtype=torch.long)
        starts = torch.cumsum(lens, 0) - lens
        offsets = torch.arange(longest)
        valid = offsets[None, :] < lens[:, None]  # [batch, longest]
        padded_index = torch.where(valid, starts[:, None] + offsets[None, :], torch.zeros((), dtype=torch.long))
        unpadded_index = (torch.arange(batch)[:, None] * longest + offsets[None, :])[valid]
        return cls(seq_lens, longest, padded_index.flatten().to(device), unpadded_index.to(device),
                   valid[:, None, None, :].to(device))


def encoder_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: EncoderAttentionMetadata,
                      scale: float) -> torch.Tensor:
    """q, k, v: [num_tokens, heads, head_dim] -> [num_tokens, heads * head_dim], each prompt on its own."""
    num_tokens, heads, head_dim = q.shape
    if len(meta.seq_lens) == 1:
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), scale=scale)
        return out.transpose(0, 1).reshape(num_tokens, heads * head_dim)
    batch, longest = len(meta.seq_lens), meta.max_seq_len

    def padded(x: torch.Tensor) -> torch.Tensor:
        return x[meta.padded_index].view(batch, longest, heads, head_dim).transpose(1, 2)

    out = F.scaled_dot_product_attention(padded(q), padded(k), padded(v), attn_mask=meta.key_mask, scale=scale)
    return out.transpose(1, 2).reshape(batch * longest, heads * head_dim)[meta.unpadded_index]
