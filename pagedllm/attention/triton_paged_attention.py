"""Paged attention with Triton kernels: the GPU backend.

Same contract as `TorchPagedAttention`, the reference: write this step's K/V at their
`slot_mapping` slots, then attend. The batch arrives decodes first (one query token each),
then prefills (prompts, chunks, prompts behind a cached prefix), so one decode kernel covers
sequences `[0, num_decodes)` and one prefill kernel the rest, both reading every key through
`AttentionMetadata.block_tables`. The kernels live in `attention/ops/`:

    reshape_and_cache  -> vLLM's reshape_and_cache_flash
    prefix_prefill     -> vLLM's prefix_prefill / the prefill half of triton_unified_attention
    paged_decode       -> vLLM's paged_attention_v1/v2 (flash-decoding splits + a reduction)

On CPU the kernels run only under `TRITON_INTERPRET=1` (slowly; for tests).
"""

from __future__ import annotations

import torch

from pagedllm.attention.metadata import AttentionMetadata
from pagedllm.attention.ops import paged_decode, prefix_prefill, reshape_and_cache
from pagedllm.attention.ops.utils import interpreting

KVCache = tuple[torch.Tensor, torch.Tensor]


class TritonPagedAttention:
    """Attention over a paged KV cache with Triton kernels (GQA, any head_dim, fp32/fp16/bf16)."""

    # It reads the batch through AttentionMetadata.query_start_loc / seq_lens / block_tables,
    # which the model runner builds only for backends that ask.
    uses_sequence_tensors = True
    # Its decode path is fixed-shape under fixed-shape metadata (see worker/cuda_graph_runner.py).
    supports_cuda_graphs = True

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if not torch.cuda.is_available() and not interpreting():
            raise ValueError("the Triton backend needs a CUDA GPU, or TRITON_INTERPRET=1 to run its kernels on CPU")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        if meta.block_tables is None or meta.seq_lens is None or meta.query_start_loc is None:
            raise ValueError("TritonPagedAttention needs AttentionMetadata.query_start_loc, seq_lens and block_tables")
        k_cache, v_cache = kv_cache
        reshape_and_cache(key, value, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty_like(query)
        num_decodes = meta.num_decodes
        if num_decodes:
            # decode_block_tables is padded to the longest decode: a bound on its seq_len.
            max_decode_len = meta.decode_block_tables.shape[1] * k_cache.shape[1]
            paged_decode(
                out[:num_decodes], query[:num_decodes], k_cache, v_cache,
                meta.block_tables[:num_decodes], meta.seq_lens[:num_decodes], max_decode_len, self.scale,
            )
        if meta.prefills:
            prefix_prefill(
                out, query, k_cache, v_cache,
                meta.block_tables[num_decodes:], meta.query_start_loc[num_decodes:], meta.seq_lens[num_decodes:],
                max(seq.query_len for seq in meta.prefills), self.scale,
            )
        return out
