"""The narrow interface between the model and attention: a backend is an implementation plus the
builder of the metadata its kernels read.

The model runner describes each step's batch once, the same way for every backend
(`CommonAttentionMetadata`: the sequences in row order, decodes first, and where each new token's
K/V goes); the backend's `AttentionMetadataBuilder` turns that into exactly what its kernels read,
and nothing else; every attention layer's `AttentionImpl.forward` gets that object. Which backend
runs is decided once at start-up (`attention/selector.py`), so no code asks at run time which one
it is talking to (vLLM v1's `AttentionBackend` / `AttentionMetadataBuilder` / `AttentionImpl`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from pagedllm.utils import async_tensor_h2d, cdiv

KVCache = tuple[torch.Tensor, torch.Tensor]


@dataclass
class CommonAttentionMetadata:
    """One step's batch as the runner lays it out: sequence i owns the next `query_lens[i]` rows,
    has `context_lens[i]` tokens cached before this step, and reaches its KV through
    `block_ids[i]`. The first `num_decodes` sequences feed one token each (sorted by length);
    the rest are prefills (prompts, chunks, recomputes). Host-side lists: a builder copies to the
    device only what its kernels read."""

    query_lens: list[int]
    context_lens: list[int]
    block_ids: list[list[int]]
    num_decodes: int
    slot_mapping: np.ndarray  # int64 [num_tokens]: cache slot (block * block_size + offset) of each row's K/V
    block_size: int

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])

    @property
    def seq_lens(self) -> list[int]:
        return [c + q for c, q in zip(self.context_lens, self.query_lens)]


def sequence_tensors(
    query_lens: list[int], seq_lens: list[int], block_ids: list[list[int]], block_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(query_start_loc, seq_lens, block_tables)` from per-sequence lists in row order; each block
    table is cut to the blocks its `seq_len` tokens occupy."""
    counts = [cdiv(n, block_size) for n in seq_lens]
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


class AttentionMetadataBuilder(ABC):
    """Built once per model runner; `build` runs every step."""

    def __init__(self, device: torch.device, model_dtype: torch.dtype, kv_cache_dtype: torch.dtype) -> None:
        self.device = device
        self.model_dtype = model_dtype
        self.kv_cache_dtype = kv_cache_dtype

    @abstractmethod
    def build(self, common: CommonAttentionMetadata) -> Any:
        """This backend's metadata for the step."""

    def build_for_cuda_graph(self, slot_mapping: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                             block_tables: torch.Tensor, max_seq_len: int) -> Any:
        """Metadata over a decode-only CUDA graph's static buffers (one token per row; `max_seq_len`
        bounds every row's length). Only backends with `supports_cuda_graphs` have it."""
        raise NotImplementedError(f"{type(self).__name__} cannot run under a CUDA graph")


class AttentionImpl(ABC):
    """One attention layer's computation: write this step's K/V into the paged cache, then attend.

    `sliding_window` (a local layer: each query sees itself and the `sliding_window - 1` keys before
    it, as transformers masks it) and `logits_soft_cap` (Gemma 2: scores pass through
    `cap * tanh(score / cap)` before the softmax) are the layer's; None means full, uncapped attention.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None, logits_soft_cap: float | None = None) -> None:
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be at least 1, got {sliding_window}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.logits_soft_cap = logits_soft_cap
        # Per-tensor scales of an fp8 KV cache (`attention/kv_quant.py`): the cache holds K / k_scale and
        # V / v_scale. 1.0 unless the checkpoint carries the layer's scales; unused for wider caches.
        self.k_scale = 1.0
        self.v_scale = 1.0

    @abstractmethod
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: KVCache,
                meta: Any) -> torch.Tensor:
        """query [T, heads, dim], key/value [T, kv_heads, dim] -> [T, heads, dim]."""

    def forward_qkv(self, qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    kv_cache: KVCache, meta: Any) -> torch.Tensor | None:
        """Rotary (half-split, full head_dim, tables [max_position, dim / 2]), the K/V write and attention
        in one call, from the fused QKV projection's output [T, (heads + 2 kv_heads) * dim], returning
        [T, heads * dim]; for steps where a backend has that fused path (the CPU one: decode-only steps),
        else None and the caller rotates and calls `forward`. Its results equal that path's."""
        return None


class AttentionBackend(ABC):
    """A name, an implementation, its metadata builder, and what the engine may do with it."""

    name: ClassVar[str]
    # Its decode path is fixed-shape under fixed-shape metadata, so it can be captured in a CUDA
    # graph (worker/cuda_graph_runner.py).
    supports_cuda_graphs: ClassVar[bool] = False

    @staticmethod
    @abstractmethod
    def get_impl_cls() -> type[AttentionImpl]: ...

    @staticmethod
    @abstractmethod
    def get_builder_cls() -> type[AttentionMetadataBuilder]: ...

    @classmethod
    def prepare(cls, device: torch.device) -> None:
        """Start-up work (building kernels) done before the first step rather than inside it."""
