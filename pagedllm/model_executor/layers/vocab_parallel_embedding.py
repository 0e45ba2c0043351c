"""The embedding and the LM head split by vocabulary over a tensor-parallel group.

Rank r holds rows [r * V/N, (r + 1) * V/N) of the (vocab x hidden) matrix, the vocabulary padded
up to a multiple of N. The embedding looks up the tokens it holds, zeroes the others and sums over
the group; the LM head computes the logits of its rows and gathers them, so every rank ends with
the same full logits. With a group of one they are `F.embedding` and one matmul, by the
`LinearMethod` the layer is built with (`logits_method`: on CPU a oneDNN-packed copy).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.distributed.parallel_state import TensorParallelGroup
from pagedllm.model_executor.layers.linear import ShardId, copy_weight
from pagedllm.model_executor.layers.linear_method import UNQUANTIZED, LinearMethodBase


class VocabParallelEmbedding(nn.Module):
    """`logits_method` multiplies by the matrix when the embedding doubles as the LM head (tied): it
    must keep `weight`, which the lookup reads."""

    def __init__(self, num_embeddings: int, embedding_dim: int, tp_group: Optional[TensorParallelGroup] = None,
                 logits_method: LinearMethodBase | None = None) -> None:
        super().__init__()
        self.linear_method = logits_method or UNQUANTIZED
        self.tp_group = tp_group or TensorParallelGroup()
        tp_rank, tp_size = self.tp_group.rank, self.tp_group.world_size
        self.num_embeddings = num_embeddings
        self.num_embeddings_per_partition = -(-num_embeddings // tp_size)
        self.vocab_start_index = tp_rank * self.num_embeddings_per_partition
        self.vocab_end_index = min(self.vocab_start_index + self.num_embeddings_per_partition, num_embeddings)
        if getattr(self.linear_method, "loads_weight", False):
            # the method holds the matrix in its own form (GGUF blocks) and looks rows up itself
            self.dtype = torch.get_default_dtype()
            self.linear_method.create_weights(self, embedding_dim, self.num_embeddings_per_partition)
            self.register_parameter("weight", None)
        else:
            self.weight = nn.Parameter(torch.empty(self.num_embeddings_per_partition, embedding_dim),
                                       requires_grad=False)

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        if loaded.shape[0] != self.num_embeddings:
            raise ValueError(f"has shape {tuple(loaded.shape)}, expected {self.num_embeddings} rows")
        rows = self.vocab_end_index - self.vocab_start_index
        copy_weight(param[:rows], loaded[self.vocab_start_index : self.vocab_end_index])
        param[rows:].zero_()  # padding rows: never looked up, their logits are cut off

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            return self.linear_method.embedding(self, input_ids, self.dtype)
        if self.tp_group.world_size == 1:
            return F.embedding(input_ids, self.weight)
        outside = (input_ids < self.vocab_start_index) | (input_ids >= self.vocab_end_index)
        local_ids = (input_ids - self.vocab_start_index).masked_fill(outside, 0)
        out = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return self.tp_group.all_reduce(out)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden @ weight^T over the whole vocabulary (an embedding doubles as a tied LM head)."""
        logits = self.linear_method.apply(self, hidden)
        if self.tp_group.world_size == 1:
            return logits
        return self.tp_group.all_gather(logits, dim=-1)[..., : self.num_embeddings]


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection of an untied model: sharded like the embedding, used only for logits
    (so its method may keep the weight in its own form alone)."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("ParallelLMHead computes logits (compute_logits); it is not an embedding")


__all__ = ["ParallelLMHead", "VocabParallelEmbedding"]
