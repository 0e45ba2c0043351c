"""Paged attention with Triton kernels: the GPU backend.

Same contract as `TorchPagedAttention`, the reference: write this step's K/V at their
`slot_mapping` slots, then attend. The batch arrives decodes first (one query token each),
then prefills (prompts, chunks, prompts behind a cached prefix), so one decode kernel covers
sequences `[0, num_decodes)` and one prefill kernel the rest, both reading every key through
`TritonAttentionMetadata.block_tables`. The kernels live in `attention/ops/`:

    reshape_and_cache  -> vLLM's reshape_and_cache_flash
    prefix_prefill     -> vLLM's prefix_prefill / the prefill half of triton_unified_attention
    paged_decode       -> vLLM's paged_attention_v1/v2 (flash-decoding splits + a reduction)

On CPU the kernels run only under `TRITON_INTERPRET=1` (slowly; for tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagedllm.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadataBuilder,
    CommonAttentionMetadata,
    KVCache,
    sequence_tensors,
)
from pagedllm.attention.kv_quant import effective_scales
from pagedllm.attention.ops import paged_decode, prefix_prefill, reshape_and_cache
from pagedllm.attention.ops.utils import interpreting
from pagedllm.utils import async_tensor_h2d


@dataclass
class TritonAttentionMetadata:
    """The batch as one flat description of all its sequences, in row order (decodes first):
    sequence i owns rows query_start_loc[i] .. query_start_loc[i + 1] - 1 [num_seqs + 1], has
    seq_lens[i] = context + new tokens [num_seqs], and its block table in block_tables[i]
    [num_seqs, max_blocks], padded with block 0. All int32."""

    slot_mapping: torch.Tensor  # [num_tokens] int64
    num_decodes: int
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    max_decode_seq_len: int  # a bound on the decodes' seq_lens: sizes the decode kernel's splits
    max_prefill_query_len: int


class TritonAttentionMetadataBuilder(AttentionMetadataBuilder):
    def __init__(self, device: torch.device, model_dtype: torch.dtype, kv_cache_dtype: torch.dtype) -> None:
        super().__init__(device, model_dtype, kv_cache_dtype)
        # Triton has e4m3 (`fp8e4nv`) only from compute capability 8.9 (Ada, Hopper); older GPUs have e5m2.
        if (kv_cache_dtype == torch.float8_e4m3fn and device.type == "cuda"
                and torch.cuda.get_device_capability(device) < (8, 9)):
            raise ValueError("kv_cache_dtype='fp8' (e4m3) needs a GPU of compute capability 8.9 or newer for "
                             "Triton's e4m3 type; use kv_cache_dtype='fp8_e5m2' on this GPU")

    def build(self, common: CommonAttentionMetadata) -> TritonAttentionMetadata:
        seq_lens = common.seq_lens
        n = common.num_decodes
        query_start_loc, seq_lens_t, block_tables = sequence_tensors(
            common.query_lens, seq_lens, common.block_ids, common.block_size, self.device)
        return TritonAttentionMetadata(
            slot_mapping=async_tensor_h2d(torch.from_numpy(common.slot_mapping), torch.long, self.device),
            num_decodes=n,
            query_start_loc=query_start_loc,
            seq_lens=seq_lens_t,
            block_tables=block_tables,
            max_decode_seq_len=max(seq_lens[:n], default=0),
            max_prefill_query_len=max(common.query_lens[n:], default=0),
        )

    def build_for_cuda_graph(self, slot_mapping: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                             block_tables: torch.Tensor, max_seq_len: int) -> TritonAttentionMetadata:
        # The decode kernel's splits are sized for the longest sequence a table can hold.
        return TritonAttentionMetadata(slot_mapping, int(seq_lens.shape[0]), query_start_loc, seq_lens, block_tables,
                                       max_decode_seq_len=max_seq_len, max_prefill_query_len=0)


class TritonPagedAttention(AttentionImpl):
    """Attention over a paged KV cache with Triton kernels (GQA, any head_dim, fp32/fp16/bf16; the cache
    also in fp8 with per-layer scales)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None, logits_soft_cap: float | None = None) -> None:
        super().__init__(num_heads, num_kv_heads, head_dim, scale, sliding_window, logits_soft_cap)
        if not torch.cuda.is_available() and not interpreting():
            raise ValueError("the Triton backend needs a CUDA GPU, or TRITON_INTERPRET=1 to run its kernels on CPU")

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,
        kv_cache: KVCache,
        meta: TritonAttentionMetadata,
    ) -> torch.Tensor:
        k_cache, v_cache = kv_cache
        k_scale, v_scale = effective_scales(k_cache.dtype, self.k_scale, self.v_scale)
        reshape_and_cache(key, value, k_cache, v_cache, meta.slot_mapping, k_scale, v_scale)
        out = torch.empty_like(query)
        num_decodes = meta.num_decodes
        if num_decodes:
            paged_decode(
                out[:num_decodes], query[:num_decodes], k_cache, v_cache,
                meta.block_tables[:num_decodes], meta.seq_lens[:num_decodes], meta.max_decode_seq_len, self.scale,
                sliding_window=self.sliding_window, soft_cap=self.logits_soft_cap,
                k_scale=k_scale, v_scale=v_scale,
            )
        if meta.max_prefill_query_len:
            prefix_prefill(
                out, query, k_cache, v_cache,
                meta.block_tables[num_decodes:], meta.query_start_loc[num_decodes:], meta.seq_lens[num_decodes:],
                meta.max_prefill_query_len, self.scale,
                sliding_window=self.sliding_window, soft_cap=self.logits_soft_cap,
                k_scale=k_scale, v_scale=v_scale,
            )
        return out


class TritonPagedAttentionBackend(AttentionBackend):
    name = "triton"
    # The decode kernel reads every key through the block table and stops at each sequence's own
    # length, so one capture serves any lengths (worker/cuda_graph_runner.py).
    supports_cuda_graphs = True

    @staticmethod
    def get_impl_cls() -> type[TritonPagedAttention]:
        return TritonPagedAttention

    @staticmethod
    def get_builder_cls() -> type[TritonAttentionMetadataBuilder]:
        return TritonAttentionMetadataBuilder
