"""Paged attention in plain PyTorch: the reference implementation and the CPU backend.

K/V live in a per-layer cache shaped [num_blocks, block_size, num_kv_heads, head_dim];
a sequence's keys are found through its block table. Each step first writes the new K/V
at their `slot_mapping` slots, then attends: decodes all at once, prefills (whole prompts,
chunks, or prompts behind a cached prefix) one by one.

Decodes on CPU go through the C++ kernel of `pagedllm.cpu_ops` when it is built, which reads the
blocks in place; otherwise (and as the reference it is tested against) they gather their
blocks into a padded copy and run SDPA over it, in groups of similar length. The metadata builder
decides which once, when it is built, and prepares only what that path reads.

The cache may hold a narrower dtype than the model computes in (`kv_cache_dtype="bfloat16"`
under float32 weights): K/V are rounded once, when written, and read back into the query's
dtype. A prompt with nothing cached before it attends over its own K/V as computed, unrounded
(the Triton backend reads every key back from the cache, rounded). An fp8 cache also scales
them by the layer's k_scale / v_scale (`attention/kv_quant.py`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from pagedllm import cpu_ops
from pagedllm.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadataBuilder,
    CommonAttentionMetadata,
    KVCache,
)
from pagedllm.attention.kv_quant import effective_scales, from_cache, write_scaled
from pagedllm.utils import async_tensor_h2d, cdiv

# Decode batches on the gather path are split into up to this many length groups (one SDPA call each).
MAX_DECODE_GROUPS = 4
MIN_DECODES_PER_GROUP = 8
# A soft-capped layer's prefill materialises its scores: this many query rows at a time
# (8 heads x 256 rows x 8192 keys in float32 is 64 MiB).
SOFT_CAP_ROWS = 256


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
class TorchAttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64
    num_decodes: int  # decodes are rows 0 .. num_decodes - 1, one token each, shortest first
    # [num_decodes, max_blocks] int64, padded with the row's first block
    decode_block_tables: torch.Tensor
    prefills: list[PrefillSequence]
    # The CPU kernel's path: [num_decodes] int64, keys each decode attends to (its new token included).
    decode_seq_lens: torch.Tensor | None = None
    # The gather path: a key mask [num_decodes, max_blocks * block_size] and the length groups
    # (first row, end row, blocks to read), so short sequences are not padded to the longest.
    decode_key_mask: torch.Tensor | None = None
    decode_groups: list[tuple[int, int, int]] = field(default_factory=list)
    # Every row is a decode and the C++ kernel reads them: `forward_qkv` can take a layer's whole step.
    decode_only: bool = False


def decode_groups(sorted_lens: list[int], block_size: int) -> list[tuple[int, int, int]]:
    """(first row, end row, blocks to read) for decodes sorted by length, in equal-count groups.

    Padding every decode to the longest one wastes gather and attention work on short
    sequences; a few groups recover most of it while keeping each call batched.
    """
    num = len(sorted_lens)
    if num == 0:
        return []
    num_groups = max(1, min(MAX_DECODE_GROUPS, num // MIN_DECODES_PER_GROUP))
    bounds = [round(i * num / num_groups) for i in range(num_groups + 1)]
    return [(s, e, cdiv(sorted_lens[e - 1], block_size)) for s, e in zip(bounds, bounds[1:])]


def decode_kernel_usable(device: torch.device, model_dtype: torch.dtype, kv_cache_dtype: torch.dtype) -> bool:
    """Whether decodes can go through the CPU kernel (built, and both dtypes among its types)."""
    return (device.type == "cpu" and model_dtype in cpu_ops.KERNEL_DTYPES
            and kv_cache_dtype in cpu_ops.KERNEL_CACHE_DTYPES and cpu_ops.cpu_kernels_available())


class TorchAttentionMetadataBuilder(AttentionMetadataBuilder):
    def __init__(self, device: torch.device, model_dtype: torch.dtype, kv_cache_dtype: torch.dtype) -> None:
        super().__init__(device, model_dtype, kv_cache_dtype)
        self.use_decode_kernel = decode_kernel_usable(device, model_dtype, kv_cache_dtype)

    def build(self, common: CommonAttentionMetadata) -> TorchAttentionMetadata:
        bs, dev, n = common.block_size, self.device, common.num_decodes
        decode_lens = [c + 1 for c in common.context_lens[:n]]
        tables = [ids[: cdiv(length, bs)] for ids, length in zip(common.block_ids[:n], decode_lens)]
        max_blocks = max((len(t) for t in tables), default=0)
        padded = np.array([t + [t[0]] * (max_blocks - len(t)) for t in tables], dtype=np.int64).reshape(n, max_blocks)
        lens = np.asarray(decode_lens, dtype=np.int64)
        meta = TorchAttentionMetadata(
            slot_mapping=async_tensor_h2d(torch.from_numpy(common.slot_mapping), torch.long, dev),
            num_decodes=n,
            decode_block_tables=async_tensor_h2d(torch.from_numpy(padded), torch.long, dev),
            prefills=[],
        )
        if self.use_decode_kernel:
            meta.decode_seq_lens = async_tensor_h2d(torch.from_numpy(lens), torch.long, dev)
        else:
            key_mask = np.arange(max_blocks * bs)[None, :] < lens[:, None]
            meta.decode_key_mask = async_tensor_h2d(torch.from_numpy(key_mask), torch.bool, dev)
            meta.decode_groups = decode_groups(decode_lens, bs)
        row = sum(common.query_lens[:n])
        for query_len, context_len, ids in zip(common.query_lens[n:], common.context_lens[n:], common.block_ids[n:]):
            block_ids = np.asarray(ids[: cdiv(context_len + query_len, bs)], dtype=np.int64)
            meta.prefills.append(PrefillSequence(row, query_len, context_len,
                                                 async_tensor_h2d(torch.from_numpy(block_ids), torch.long, dev)))
            row += query_len
        meta.decode_only = self.use_decode_kernel and n > 0 and not meta.prefills
        return meta


def write_to_kv_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: KVCache, slot_mapping: torch.Tensor,
                      k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Scatter this step's K/V [num_tokens, num_kv_heads, head_dim] into their cache slots (divided by the
    layer's scales when the cache is fp8)."""
    write_scaled(key, value, *kv_cache, slot_mapping, k_scale, v_scale)


class TorchPagedAttention(AttentionImpl):
    """Attention over a paged KV cache with `torch.nn.functional.scaled_dot_product_attention`.

    A local (sliding-window) or soft-capped layer takes `_forward_masked`: an explicit key mask by
    position, reading only the blocks its window reaches, and the scores capped before the softmax.
    The C++ decode kernel and SDPA's causal fast path know neither."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None, logits_soft_cap: float | None = None) -> None:
        super().__init__(num_heads, num_kv_heads, head_dim, scale, sliding_window, logits_soft_cap)
        self.gqa = num_heads != num_kv_heads
        self.masked = sliding_window is not None or logits_soft_cap is not None

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,
        kv_cache: KVCache,
        meta: TorchAttentionMetadata,
    ) -> torch.Tensor:
        write_to_kv_cache(key, value, kv_cache, meta.slot_mapping, self.k_scale, self.v_scale)
        if self.masked:
            return self._forward_masked(query, key, value, kv_cache, meta)
        out = torch.empty_like(query)
        if meta.num_decodes and meta.decode_seq_lens is not None:
            n = meta.num_decodes  # decodes are rows 0 .. n - 1
            k_scale, v_scale = effective_scales(kv_cache[0].dtype, self.k_scale, self.v_scale)
            cpu_ops.paged_decode(out[:n], query[:n], *kv_cache, meta.decode_block_tables, meta.decode_seq_lens,
                                 self.scale, k_scale=k_scale, v_scale=v_scale)
        elif meta.num_decodes:
            self._decode_groups(query, kv_cache, meta, out)
        for seq in meta.prefills:
            rows = slice(seq.token_start, seq.token_start + seq.query_len)
            if seq.context_len == 0:
                # Nothing cached before: attend over this step's own K/V, no gather needed.
                k, v = key[rows], value[rows]
            else:
                k, v = self._widen(self._gather(kv_cache, seq.block_ids, seq.seq_len), query.dtype)
            out[rows] = self._prefill(query[rows], k, v, seq.context_len)
        return out

    def forward_qkv(self, qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    kv_cache: KVCache, meta: TorchAttentionMetadata) -> torch.Tensor | None:
        """A decode-only step in one C++ op (`cpu_ops.decode_attention`: rotary, the K/V write and the
        decode kernel, local and soft-capped layers included); None for a step with prefills, or over
        an fp8 cache (its scaled write stays in `forward`)."""
        if not meta.decode_only or kv_cache[0].dtype not in cpu_ops.KERNEL_DTYPES:
            return None
        return cpu_ops.decode_attention(qkv, positions, cos, sin, kv_cache[0], kv_cache[1], meta.slot_mapping,
                                        meta.decode_block_tables, meta.decode_seq_lens, self.num_heads,
                                        self.num_kv_heads, self.scale, self.sliding_window, self.logits_soft_cap)

    # ----- local (sliding-window) and soft-capped layers ------------------------------------
    def _forward_masked(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: KVCache,
                        meta: TorchAttentionMetadata) -> torch.Tensor:
        out = torch.empty_like(query)
        block_size = kv_cache[0].shape[1]
        n = meta.num_decodes
        if n and meta.decode_seq_lens is not None:  # the C++ kernel, from the window's first block
            cpu_ops.paged_decode(out[:n], query[:n], *kv_cache, meta.decode_block_tables, meta.decode_seq_lens,
                                 self.scale, self.sliding_window, self.logits_soft_cap,
                                 *effective_scales(kv_cache[0].dtype, self.k_scale, self.v_scale))
        elif n:
            lens = meta.decode_key_mask.sum(1)
            out[:n] = self._decode_masked(query[:n], kv_cache, meta.decode_block_tables, lens)
        for seq in meta.prefills:
            rows = slice(seq.token_start, seq.token_start + seq.query_len)
            if seq.context_len == 0:
                k, v, first_key = key[rows], value[rows], 0
            else:
                # The first block holding a key that some query of this chunk still sees.
                first_block = 0
                if self.sliding_window is not None:
                    first_block = max(0, seq.context_len - self.sliding_window + 1) // block_size
                first_key = first_block * block_size
                k, v = self._widen(self._gather(kv_cache, seq.block_ids[first_block:], seq.seq_len - first_key),
                                   query.dtype)
            q_pos = torch.arange(seq.context_len, seq.seq_len, device=query.device)
            k_pos = torch.arange(first_key, seq.seq_len, device=query.device)
            mask = self._key_mask(q_pos[:, None], k_pos[None, :])
            q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (query[rows], k, v))
            out[rows] = self._attend(q, k, v, mask).squeeze(0).transpose(0, 1)
        return out

    def _key_mask(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """Causal, and within the window: query p sees keys p - sliding_window < j <= p."""
        mask = k_pos <= q_pos
        if self.sliding_window is not None:
            mask &= k_pos > q_pos - self.sliding_window
        return mask

    def _decode_masked(self, q: torch.Tensor, kv_cache: KVCache, block_tables: torch.Tensor,
                       seq_lens: torch.Tensor) -> torch.Tensor:
        """Decodes of a local or capped layer; a local layer reads only the blocks its window spans."""
        block_size = kv_cache[0].shape[1]
        n, max_blocks = block_tables.shape
        block_idx = torch.arange(max_blocks, device=q.device).expand(n, max_blocks)
        if self.sliding_window is not None:
            # The window's keys span at most this many blocks, starting at the block of key seq_len - window.
            span = min(max_blocks, cdiv(self.sliding_window - 1, block_size) + 1)
            first = ((seq_lens - self.sliding_window).clamp(min=0) // block_size).clamp(max=max_blocks - span)
            block_idx = first[:, None] + torch.arange(span, device=q.device)
            block_tables = block_tables.gather(1, block_idx)
        k_pos = (block_idx[:, :, None] * block_size + torch.arange(block_size, device=q.device)).flatten(1)
        mask = self._key_mask((seq_lens - 1)[:, None], k_pos)
        flat = block_tables.reshape(-1)
        k, v = self._widen((c.index_select(0, flat).view(n, -1, *c.shape[2:]).transpose(1, 2) for c in kv_cache),
                           q.dtype)
        return self._attend(q.unsqueeze(2), k, v, mask[:, None, None, :]).squeeze(2)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """q [b, heads, len, dim], k/v [b, kv_heads, keys, dim], mask [b or 1, 1 or heads, len, keys] or
        [len, keys]."""
        if self.logits_soft_cap is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=self.gqa)
        if self.gqa:
            group = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        # As transformers' eager Gemma 2 attention: scale, cap, mask, softmax in float32. The scores are
        # materialised, so a long prompt goes SOFT_CAP_ROWS query rows at a time.
        out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=v.dtype, device=q.device)
        for start in range(0, q.shape[-2], SOFT_CAP_ROWS):
            rows = slice(start, start + SOFT_CAP_ROWS)
            scores = torch.matmul(q[..., rows, :].float(), k.float().transpose(-1, -2)) * self.scale
            scores = torch.tanh(scores / self.logits_soft_cap) * self.logits_soft_cap
            scores = scores.masked_fill(~mask[..., rows, :], float("-inf"))
            out[..., rows, :] = torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)
        return out

    def _decode_groups(self, query: torch.Tensor, kv_cache: KVCache, meta: TorchAttentionMetadata,
                       out: torch.Tensor) -> None:
        """The PyTorch decode path: each length group gathered and attended in one SDPA call."""
        for start, end, num_blocks in meta.decode_groups:
            out[start:end] = self._decode(
                query[start:end], kv_cache, meta.decode_block_tables[start:end, :num_blocks],
                meta.decode_key_mask[start:end, : num_blocks * kv_cache[0].shape[1]],
            )

    def _widen(self, kv: Iterable[torch.Tensor], dtype: torch.dtype) -> KVCache:
        """Gathered K and V in the compute dtype (times the layer's scales when the cache is fp8)."""
        k, v = kv
        return from_cache(k, dtype, self.k_scale), from_cache(v, dtype, self.v_scale)

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
        n, num_blocks = block_tables.shape
        flat = block_tables.reshape(-1)
        # [n * blocks, block_size, kv_heads, dim] -> [n, kv_heads, keys, dim]
        k, v = self._widen((c.index_select(0, flat).view(n, -1, *c.shape[2:]).transpose(1, 2) for c in kv_cache),
                           q.dtype)
        mask = key_mask[:, None, None, :]
        o = F.scaled_dot_product_attention(
            q.unsqueeze(2), k, v, attn_mask=mask, scale=self.scale, enable_gqa=self.gqa
        )  # [num_decodes, heads, 1, dim]
        return o.squeeze(2)


class TorchPagedAttentionBackend(AttentionBackend):
    name = "torch"
    # It gathers whole blocks up to the longest decode's length: in a graph that would be
    # max_model_len keys for every row of every step, so it stays eager (as vLLM falls back to
    # eager for backends without graph support).
    supports_cuda_graphs = False

    @staticmethod
    def get_impl_cls() -> type[TorchPagedAttention]:
        return TorchPagedAttention

    @staticmethod
    def get_builder_cls() -> type[TorchAttentionMetadataBuilder]:
        return TorchAttentionMetadataBuilder

    @classmethod
    def prepare(cls, device: torch.device) -> None:
        """Build or load the CPU kernel at start-up rather than inside the first step."""
        if device.type == "cpu":
            cpu_ops.cpu_kernels_available()
