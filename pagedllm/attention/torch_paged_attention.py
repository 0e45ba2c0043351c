"""Paged attention in plain PyTorch: the reference implementation and the CPU backend.

K/V live in a per-layer cache shaped [num_blocks, block_size, num_kv_heads, head_dim];
a sequence's keys are found through its block table. Each step first writes the new K/V
at their `slot_mapping` slots, then attends: decodes all at once, prefills (whole prompts,
chunks, or prompts behind a cached prefix) one by one.

Decodes on CPU go through the C++ kernel of `pagedllm.cpu_ops` when it is built, which reads the
blocks in place; otherwise (and as the reference it is tested against) they gather their
blocks into a padded copy and run SDPA over it.

The cache may hold a narrower dtype than the model computes in (`kv_cache_dtype="bfloat16"`
under float32 weights): K/V are rounded once, when written, and read back into the query's
dtype. A prompt with nothing cached before it attends over its own K/V as computed, unrounded
(the Triton backend reads every key back from the cache, rounded).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pagedllm import cpu_ops
from pagedllm.attention.metadata import AttentionMetadata

KVCache = tuple[torch.Tensor, torch.Tensor]


def write_to_kv_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: KVCache, slot_mapping: torch.Tensor) -> None:
    """Scatter this step's K/V [num_tokens, num_kv_heads, head_dim] into their cache slots."""
    k_cache, v_cache = kv_cache
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, value.to(v_cache.dtype))


class TorchPagedAttention:
    """Attention over a paged KV cache with `torch.nn.functional.scaled_dot_product_attention`."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.gqa = num_heads != num_kv_heads

    @staticmethod
    def prepare(device: torch.device) -> None:
        """Build or load the CPU kernel at start-up rather than inside the first step."""
        if device.type == "cpu":
            cpu_ops.cpu_kernels_available()

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        write_to_kv_cache(key, value, kv_cache, meta.slot_mapping)
        out = torch.empty_like(query)
        if meta.num_decodes and self._use_cpu_kernel(query, kv_cache, meta):
            n = meta.num_decodes  # decodes are rows 0 .. n - 1
            cpu_ops.paged_decode(out[:n], query[:n], *kv_cache, meta.decode_block_tables, meta.decode_seq_lens,
                                 self.scale)
        else:
            self._decode_groups(query, kv_cache, meta, out)
        for seq in meta.prefills:
            rows = slice(seq.token_start, seq.token_start + seq.query_len)
            if seq.context_len == 0:
                # Nothing cached before: attend over this step's own K/V, no gather needed.
                k, v = key[rows], value[rows]
            else:
                k, v = (t.to(query.dtype) for t in self._gather(kv_cache, seq.block_ids, seq.seq_len))
            out[rows] = self._prefill(query[rows], k, v, seq.context_len)
        return out

    @staticmethod
    def _use_cpu_kernel(query: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata) -> bool:
        return (
            query.device.type == "cpu"
            and query.dtype in cpu_ops.KERNEL_DTYPES
            and kv_cache[0].dtype in cpu_ops.KERNEL_DTYPES
            and meta.decode_seq_lens is not None
            and cpu_ops.cpu_kernels_available()
        )

    def _decode_groups(self, query: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata,
                       out: torch.Tensor) -> None:
        """The PyTorch decode path: each length group gathered and attended in one SDPA call."""
        for start, end, num_blocks in meta.decode_groups:
            out[start:end] = self._decode(
                query[start:end], kv_cache, meta.decode_block_tables[start:end, :num_blocks],
                meta.decode_key_mask[start:end, : num_blocks * kv_cache[0].shape[1]],
            )

    def _gather(self, kv_cache: KVCache, block_ids: torch.Tensor, seq_len: int) -> KVCache:
        k_cache, v_cache = kv_cache
        # index_select is several times faster than advanced indexing for this gather on CPU.
        k = k_cache.index_select(0, block_ids).flatten(0, 1)[:seq_len]
        v = v_cache.index_select(0, block_ids).flatten(0, 1)[:seq_len]
        return k, v

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context_len: int) -> torch.Tensor:
        # [len, heads, dim] -> [1, heads, len, dim]. The batch dimension matters: on CPU, 3-D inputs
        # with enable_gqa fall back to SDPA's unfused math path, 2-6x slower than the flash kernel.
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        if context_len == 0:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=self.gqa)
        else:
            # Query i sits at position context_len + i and sees keys 0..context_len + i.
            q_pos = torch.arange(context_len, context_len + q.shape[2], device=q.device)
            mask = torch.arange(k.shape[2], device=q.device)[None, :] <= q_pos[:, None]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=self.gqa)
        return o.squeeze(0).transpose(0, 1)

    def _decode(
        self, q: torch.Tensor, kv_cache: KVCache, block_tables: torch.Tensor, key_mask: torch.Tensor
    ) -> torch.Tensor:
        k_cache, v_cache = kv_cache
        n, num_blocks = block_tables.shape
        flat = block_tables.reshape(-1)
        # [n * blocks, block_size, kv_heads, dim] -> [n, kv_heads, keys, dim]
        k = k_cache.index_select(0, flat).view(n, -1, *k_cache.shape[2:]).transpose(1, 2).to(q.dtype)
        v = v_cache.index_select(0, flat).view(n, -1, *v_cache.shape[2:]).transpose(1, 2).to(q.dtype)
        mask = key_mask[:, None, None, :]
        o = F.scaled_dot_product_attention(
            q.unsqueeze(2), k, v, attn_mask=mask, scale=self.scale, enable_gqa=self.gqa
        )  # [num_decodes, heads, 1, dim]
        return o.squeeze(2)
