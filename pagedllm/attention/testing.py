"""Random paged batches with a plain-SDPA reference, for checking attention backends.

Used by `tests/test_triton_attention.py` and `benchmarks/gpu_check.py`. A batch is a list of
sequences `(context_len, query_len)`: `context_len` tokens already cached, `query_len` new
ones this step (1 for a decode). Every sequence's K/V sit in a shuffled paged cache; slots no
sequence owns hold `fill` (NaN by default), so a kernel that reads past its mask returns NaN.
The cache may be stored in another dtype than the queries (`cache_dtype`, as `kv_cache_dtype`
does); K/V are then drawn already representable in it, so the reference stays exact whichever
path (fresh K/V or read back from the cache) a backend takes. An fp8 cache has per-tensor scales
(`k_scale`, `v_scale`: powers of two keep "representable" exact through the division).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from pagedllm.attention.backend import AttentionBackend, CommonAttentionMetadata, sequence_tensors
from pagedllm.attention.kv_quant import byte_view, from_cache, to_cache
from pagedllm.attention.torch_paged_attention import TorchPagedAttentionBackend
from pagedllm.utils import cdiv


class PagedBatch:
    """`keys[i]`/`values[i]` hold sequence i's full K/V (context and new tokens), also present in
    the cache through `tables[i]`; `queries[i]` its `query_len` new query rows."""

    def __init__(
        self,
        seqs: list[tuple[int, int]],
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        block_size: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        seed: int = 0,
        fill: float = float("nan"),
        cache_dtype: torch.dtype | None = None,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
    ) -> None:
        self.seqs, self.block_size, self.head_dim = seqs, block_size, head_dim
        self.k_scale, self.v_scale = k_scale, v_scale
        self.num_heads, self.num_kv_heads, self.device = num_heads, num_kv_heads, torch.device(device)
        gen = torch.Generator(self.device).manual_seed(seed)
        num_blocks = sum(cdiv(c + q, block_size) for c, q in seqs) + 2
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        cache_dtype = cache_dtype or dtype
        self.k_cache = torch.full(shape, fill, dtype=torch.float32, device=self.device).to(cache_dtype)
        self.v_cache = torch.full(shape, fill, dtype=torch.float32, device=self.device).to(cache_dtype)
        free = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
        self.tables: list[list[int]] = []
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.queries: list[torch.Tensor] = []
        for context_len, query_len in seqs:
            seq_len = context_len + query_len
            table = [free.pop() for _ in range(cdiv(seq_len, block_size))]
            k, v = (from_cache(to_cache(torch.randn(seq_len, num_kv_heads, head_dim, generator=gen,
                                                    device=self.device), cache_dtype, scale), dtype, scale)
                    for scale in (k_scale, v_scale))
            slots = self.slots(table, 0, seq_len)
            self._store(self.k_cache, slots, to_cache(k, cache_dtype, k_scale))
            self._store(self.v_cache, slots, to_cache(v, cache_dtype, v_scale))
            self.tables.append(table)
            self.keys.append(k)
            self.values.append(v)
            self.queries.append(torch.randn(query_len, num_heads, head_dim, generator=gen, device=self.device).to(dtype))
        self.query_start_loc, self.seq_lens, self.block_tables = sequence_tensors(
            [q for _, q in seqs], [c + q for c, q in seqs], self.tables, block_size, self.device
        )

    def _store(self, cache: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor | float) -> None:
        """cache's `slots` := rows (already in the cache dtype) or a constant, through the bytes for fp8,
        which PyTorch cannot index-put into on CPU."""
        if not isinstance(rows, torch.Tensor):
            rows = torch.full((len(slots), self.num_kv_heads, self.head_dim), rows, device=self.device).to(cache.dtype)
        byte_view(cache).view(-1, self.num_kv_heads, self.head_dim)[slots] = byte_view(rows)

    def slots(self, table: list[int], start: int, end: int) -> torch.Tensor:
        """Flat cache slots of positions start .. end - 1 of a sequence with this block table."""
        pos = torch.arange(start, end, device=self.device)
        return torch.tensor(table, device=self.device)[pos // self.block_size] * self.block_size + pos % self.block_size

    @property
    def query(self) -> torch.Tensor:
        return torch.cat(self.queries)

    @property
    def max_query_len(self) -> int:
        return max(q for _, q in self.seqs)

    @property
    def max_seq_len(self) -> int:
        return max(c + q for c, q in self.seqs)

    def reference(self, sliding_window: int | None = None, soft_cap: float | None = None) -> torch.Tensor:
        """All sequences' attention output in fp32: query j of a sequence sees keys 0 .. context_len + j
        (only the last `sliding_window` of them for a local layer; scores capped at `soft_cap`)."""
        outs = []
        for (context_len, query_len), q, k, v in zip(self.seqs, self.queries, self.keys, self.values):
            q, k, v = (t.float().transpose(0, 1) for t in (q, k, v))
            q_pos = torch.arange(context_len, context_len + query_len, device=self.device)
            k_pos = torch.arange(k.shape[1], device=self.device)[None, :]
            mask = k_pos <= q_pos[:, None]
            if sliding_window is not None:
                mask &= k_pos > q_pos[:, None] - sliding_window
            if soft_cap is None:
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.head_dim**-0.5,
                                                   enable_gqa=True)
            else:
                k, v = (t.repeat_interleave(self.num_heads // self.num_kv_heads, dim=0) for t in (k, v))
                scores = q @ k.transpose(-1, -2) * self.head_dim**-0.5
                scores = (torch.tanh(scores / soft_cap) * soft_cap).masked_fill(~mask, float("-inf"))
                o = torch.softmax(scores, dim=-1) @ v
            outs.append(o.transpose(0, 1))
        return torch.cat(outs)

    def drop_outside_window(self, sliding_window: int) -> None:
        """Blank (to `nan`) every block that lies wholly before the window of its sequence's first
        query, as the KV-cache manager frees them: a local layer's kernel must not read them."""
        for (context_len, _), table in zip(self.seqs, self.tables):
            for block in table[: max(0, context_len - sliding_window + 1) // self.block_size]:
                block_slots = torch.arange(block * self.block_size, (block + 1) * self.block_size, device=self.device)
                self._store(self.k_cache, block_slots, float("nan"))
                self._store(self.v_cache, block_slots, float("nan"))

    def take_new_kv(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This step's `(key, value, slot_mapping)`, with their slots blanked (to `nan`) in the
        cache: what a backend's forward receives before it writes them."""
        keys, values, slots = [], [], []
        for (context_len, query_len), table, k, v in zip(self.seqs, self.tables, self.keys, self.values):
            slot = self.slots(table, context_len, context_len + query_len)
            self._store(self.k_cache, slot, float("nan"))
            self._store(self.v_cache, slot, float("nan"))
            keys.append(k[context_len:])
            values.append(v[context_len:])
            slots.append(slot)
        return torch.cat(keys), torch.cat(values), torch.cat(slots)

    def metadata(self, slot_mapping: torch.Tensor,
                 backend: type[AttentionBackend] = TorchPagedAttentionBackend) -> Any:
        """`backend`'s metadata for this batch, from its own builder, as the model runner gets it
        (decodes must come first)."""
        num_decodes = next((i for i, (_, q) in enumerate(self.seqs) if q != 1), len(self.seqs))
        if any(q == 1 for _, q in self.seqs[num_decodes:]):
            raise ValueError("decodes (query_len 1) must come first in the batch")
        common = CommonAttentionMetadata(
            query_lens=[q for _, q in self.seqs], context_lens=[c for c, _ in self.seqs], block_ids=self.tables,
            num_decodes=num_decodes, slot_mapping=slot_mapping.cpu().numpy(), block_size=self.block_size,
        )
        dtype = self.queries[0].dtype if self.queries else torch.float32
        builder = backend.get_builder_cls()(self.device, dtype, self.k_cache.dtype)
        return builder.build(common)
