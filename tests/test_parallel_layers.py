"""The parallel layers' weight slicing, without processes: each rank's slice, put back together,
is the full layer (a fake group of N, rank r, for the loaders; collectives are not called)."""

from __future__ import annotations

import torch

from pagedllm.distributed.parallel_state import TensorParallelGroup
from pagedllm.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from pagedllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding


def ranks(n: int) -> list[TensorParallelGroup]:
    return [TensorParallelGroup(rank=r, world_size=n) for r in range(n)]


def test_qkv_slices_heads_and_fused_or_separate_loading_agree():
    hd, heads, kv_heads, hidden = 4, 4, 2, 8
    q, k, v = torch.randn(heads * hd, hidden), torch.randn(kv_heads * hd, hidden), torch.randn(kv_heads * hd, hidden)
    for g in ranks(2):
        separate = QKVParallelLinear(hidden, hd, heads, kv_heads, tp_group=g)
        for name, w in zip("qkv", (q, k, v)):
            separate.weight_loader(separate.weight, w, name)
        fused = QKVParallelLinear(hidden, hd, heads, kv_heads, tp_group=g)
        fused.weight_loader(fused.weight, torch.cat([q, k, v]), None)
        r = g.rank
        expected = torch.cat([q[r * 8 : (r + 1) * 8], k[r * 4 : (r + 1) * 4], v[r * 4 : (r + 1) * 4]])
        assert torch.equal(separate.weight, expected) and torch.equal(fused.weight, expected)


def test_row_and_merged_column_slices_sum_to_the_full_product():
    hidden, inter = 6, 8
    gate, up, down = torch.randn(inter, hidden), torch.randn(inter, hidden), torch.randn(hidden, inter)
    x = torch.randn(3, hidden)
    full = (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T
    partial = torch.zeros_like(full)
    for g in ranks(2):
        gate_up = MergedColumnParallelLinear(hidden, [inter, inter], tp_group=g)
        gate_up.weight_loader(gate_up.weight, gate, 0)
        gate_up.weight_loader(gate_up.weight, up, 1)
        row = RowParallelLinear(inter, hidden, tp_group=g)
        row.weight_loader(row.weight, down)
        a, b = torch.nn.functional.linear(x, gate_up.weight).chunk(2, dim=-1)
        partial += torch.nn.functional.linear(torch.nn.functional.silu(a) * b, row.weight)  # the all-reduce
    torch.testing.assert_close(partial, full)


def test_vocab_is_padded_and_split():
    table = torch.randn(7, 4)
    shards = []
    for g in ranks(2):
        emb = VocabParallelEmbedding(7, 4, g)
        emb.weight_loader(emb.weight, table)
        assert emb.weight.shape == (4, 4)
        shards.append(emb.weight)
    assert torch.equal(torch.cat(shards)[:7], table) and torch.equal(shards[1][3], torch.zeros(4))
