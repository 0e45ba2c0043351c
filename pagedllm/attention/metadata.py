"""`AttentionMetadata`: everything attention needs about the flattened batch, built once per step.

Passed explicitly through the model's forward (never through global state). The model
runner builds it; every layer's attention reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PrefillSequence:
    """A sequence feeding more than one token this step (a prompt, a chunk, a recompute)."""

    token_start: int  # first row of this sequence in the flattened batch
    query_len: int
    context_len: int  # tokens already in the KV cache before this step
    block_ids: torch.Tensor  # the blocks covering context_len + query_len tokens

    @property
    def seq_len(self) -> int:
        return self.context_len + self.query_len


@dataclass
class AttentionMetadata:
    # [num_tokens]: flat cache slot (block_id * block_size + offset) each new K/V is written to.
    slot_mapping: torch.Tensor
    # Decodes (one new token each) come first in the flattened batch, sorted by length:
    # their rows, their block tables [num_decodes, max_blocks] and a key mask
    # [num_decodes, max_blocks * block_size].
    decode_token_idx: torch.Tensor
    decode_block_tables: torch.Tensor
    decode_key_mask: torch.Tensor
    prefills: list[PrefillSequence]
    num_tokens: int
    # Decode rows split into groups of similar length, (first row, end row, blocks to read),
    # so short sequences are not padded to the longest one's length.
    decode_groups: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def num_decodes(self) -> int:
        return int(self.decode_token_idx.numel())
