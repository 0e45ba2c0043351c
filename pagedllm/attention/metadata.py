"""`AttentionMetadata`: everything attention needs about the flattened batch, built once per step.

Passed explicitly through the model's forward (never through global state). The model
runner builds it; every layer's attention reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pagedllm.utils import async_tensor_h2d


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
    # [num_decodes] int64: keys each decode attends to (its new token included), for the CPU
    # kernel, which reads decode_block_tables in place instead of gathering through the mask.
    decode_seq_lens: torch.Tensor | None = None
    # The same batch as one flat description of all its sequences, in row order (decodes first),
    # for kernels that take it whole (the Triton backend; see `sequence_tensors`):
    # sequence i owns rows query_start_loc[i] .. query_start_loc[i + 1] - 1 [num_seqs + 1],
    # has seq_lens[i] = context + new tokens [num_seqs], and its block table in block_tables[i]
    # [num_seqs, max_blocks], padded with block 0. All int32.
    query_start_loc: torch.Tensor | None = None
    seq_lens: torch.Tensor | None = None
    block_tables: torch.Tensor | None = None

    @property
    def num_decodes(self) -> int:
        return int(self.decode_token_idx.numel())


def sequence_tensors(
    query_lens: list[int], seq_lens: list[int], block_ids: list[list[int]], block_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(query_start_loc, seq_lens, block_tables)` for `AttentionMetadata`, from per-sequence lists
    in row order; each block table is cut to the blocks its `seq_len` tokens occupy."""
    counts = [-(-n // block_size) for n in seq_lens]
    tables = np.zeros((len(seq_lens), max(counts, default=0)), dtype=np.int32)
    for row, ids, count in zip(tables, block_ids, counts):
        row[:count] = ids[:count]
    starts = np.zeros(len(query_lens) + 1, dtype=np.int32)
    np.cumsum(query_lens, out=starts[1:])
    return (
        async_tensor_h2d(torch.from_numpy(starts), torch.int32, device),
        async_tensor_h2d(seq_lens, torch.int32, device),
        async_tensor_h2d(torch.from_numpy(tables), torch.int32, device),
    )
