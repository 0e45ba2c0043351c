"""The CPU kernels (`pagedllm/csrc/cpu/`) agree with PyTorch: decode attention with the SDPA
reference, the elementwise ops with the eager functions of `layers/fused_ops.py`.

For attention every cache slot no sequence owns holds NaN (`PagedBatch`), so a kernel that
reads past a sequence's length or through a wrong block shows NaN instead of a small error.
The backend and whole generations are also run with the kernels switched off, so both paths
stay tested. Locally these tests skip without a C++ compiler; under CI (`CI=true`) a missing
kernel is a failure, since it is what every CPU step runs.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pagedllm import cpu_ops
from pagedllm.attention.testing import PagedBatch
from pagedllm.attention.torch_paged_attention import TorchPagedAttention
from pagedllm.model_executor.layers import fused_ops
from pagedllm.model_executor.layers.fused_ops import CpuKernelOps

ATOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def cached_batch(seqs, num_heads, num_kv_heads, head_dim, block_size, dtype) -> PagedBatch:
    """A batch whose new tokens are already in the cache, as the backend leaves it before attending."""
    batch = PagedBatch(seqs, num_heads, num_kv_heads, head_dim, block_size, dtype=dtype)
    key, value, slots = batch.take_new_kv()
    batch.k_cache.view(-1, num_kv_heads, head_dim)[slots] = key
    batch.v_cache.view(-1, num_kv_heads, head_dim)[slots] = value
    batch.slot_mapping = slots
    return batch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim,block_size",
    [(9, 3, 64, 16), (4, 4, 32, 8), (8, 2, 16, 32), (6, 1, 64, 1)],
)
def test_decode_matches_sdpa_reference(kernel, dtype, num_heads, num_kv_heads, head_dim, block_size):
    # Lengths on and around block boundaries, a first token (context 0) and a long one.
    contexts = [0, 1, block_size - 1, block_size, block_size + 1, 3 * block_size + 5, 200]
    batch = cached_batch([(c, 1) for c in contexts], num_heads, num_kv_heads, head_dim, block_size, dtype)
    meta = batch.metadata(batch.slot_mapping)
    out = torch.full_like(batch.query, float("nan"))
    cpu_ops.paged_decode(out, batch.query, batch.k_cache, batch.v_cache, meta.decode_block_tables,
                             meta.decode_seq_lens, head_dim**-0.5)
    assert not out.isnan().any(), "the kernel read a slot it should not have"
    torch.testing.assert_close(out.float(), batch.reference(), atol=ATOL[dtype], rtol=0)


@pytest.mark.parametrize("query_dtype", [torch.float32, torch.bfloat16])
def test_decode_reads_a_bfloat16_cache_under_any_query_dtype(kernel, query_dtype):
    # kv_cache_dtype='bfloat16' under float32 weights: a float32 query over a bf16 cache.
    contexts = [0, 15, 16, 17, 100]
    batch = PagedBatch([(c, 1) for c in contexts], 9, 3, 64, 16, dtype=query_dtype, cache_dtype=torch.bfloat16)
    key, value, slots = batch.take_new_kv()
    batch.k_cache.view(-1, 3, 64)[slots] = key.bfloat16()
    batch.v_cache.view(-1, 3, 64)[slots] = value.bfloat16()
    meta = batch.metadata(slots)
    out = torch.full_like(batch.query, float("nan"))
    cpu_ops.paged_decode(out, batch.query, batch.k_cache, batch.v_cache, meta.decode_block_tables,
                         meta.decode_seq_lens, 64**-0.5)
    assert out.dtype == query_dtype and not out.isnan().any()
    torch.testing.assert_close(out.float(), batch.reference(), atol=ATOL[query_dtype], rtol=0)


def test_decode_reads_strided_query_rows(kernel):
    # The model hands attention a view into its fused QKV projection: rows are strided.
    batch = cached_batch([(c, 1) for c in (3, 40, 17)], 4, 2, 32, 16, torch.float32)
    meta = batch.metadata(batch.slot_mapping)
    qkv = torch.cat([batch.query.flatten(1), torch.randn(3, 64)], dim=1)
    query = qkv[:, : 4 * 32].view(3, 4, 32)
    assert not query.is_contiguous()
    out = torch.empty(3, 4, 32)
    cpu_ops.paged_decode(out, query, batch.k_cache, batch.v_cache, meta.decode_block_tables,
                             meta.decode_seq_lens, 32**-0.5)
    torch.testing.assert_close(out, batch.reference(), atol=1e-5, rtol=0)


def test_one_long_sequence_uses_every_kv_head(kernel):
    # A single decode is split across threads by KV head; each head must see its own keys.
    batch = cached_batch([(700, 1)], 8, 4, 64, 16, torch.float32)
    meta = batch.metadata(batch.slot_mapping)
    out = torch.empty_like(batch.query)
    cpu_ops.paged_decode(out, batch.query, batch.k_cache, batch.v_cache, meta.decode_block_tables,
                             meta.decode_seq_lens, 64**-0.5)
    torch.testing.assert_close(out, batch.reference(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_kernel", [True, False])
def test_backend_mixed_batch_with_and_without_kernel(kernel, monkeypatch, use_kernel, cache_dtype):
    """Decodes (kernel or gather + SDPA) and prefills (fresh and behind a cached prefix) in one step,
    over a float32 cache or a bfloat16 one (kv_cache_dtype) under float32 compute."""
    if not use_kernel:
        monkeypatch.setattr(cpu_ops, "cpu_kernels_available", lambda: False)
    seqs = [(5, 1), (16, 1), (47, 1), (0, 9), (20, 7)]
    # The gather path reads the padding of partly filled blocks (masked out, but NaN * 0 is
    # NaN), so only the kernel is run against a NaN-filled cache.
    batch = PagedBatch(seqs, 6, 2, 32, 16, fill=float("nan") if use_kernel else 0.0, cache_dtype=cache_dtype)
    key, value, slots = batch.take_new_kv()
    attn = TorchPagedAttention(6, 2, 32, 32**-0.5)
    out = attn.forward(batch.query, key, value, (batch.k_cache, batch.v_cache), batch.metadata(slots))
    assert not out.isnan().any()
    torch.testing.assert_close(out, batch.reference(), atol=1e-5, rtol=0)


def test_bad_inputs_raise_clear_errors(kernel):
    batch = cached_batch([(4, 1)], 4, 2, 32, 16, torch.float32)
    meta = batch.metadata(batch.slot_mapping)
    args = (batch.k_cache, batch.v_cache, meta.decode_block_tables, meta.decode_seq_lens, 0.1)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        half = batch.query.half()
        cpu_ops.paged_decode(torch.empty_like(half), half, batch.k_cache.half(), batch.v_cache.half(),
                                 *args[2:])
    with pytest.raises(RuntimeError, match="int64"):
        cpu_ops.paged_decode(torch.empty_like(batch.query), batch.query, batch.k_cache, batch.v_cache,
                                 meta.decode_block_tables.int(), meta.decode_seq_lens, 0.1)
    with pytest.raises(RuntimeError, match="share a dtype"):
        q = batch.query.bfloat16()
        cpu_ops.paged_decode(torch.empty_like(batch.query), q, *args)
    with pytest.raises(RuntimeError, match="share a dtype"):
        cpu_ops.paged_decode(torch.empty_like(batch.query), batch.query, batch.k_cache, batch.v_cache.bfloat16(),
                             *args[2:])
    # Lengths and block ids that would read outside the cache are refused, not followed.
    out = torch.empty_like(batch.query)
    too_long = torch.tensor([meta.decode_block_tables.shape[1] * 16 + 1])
    with pytest.raises(RuntimeError, match="seq_lens"):
        cpu_ops.paged_decode(out, batch.query, batch.k_cache, batch.v_cache, meta.decode_block_tables, too_long, 0.1)
    bad_table = torch.full_like(meta.decode_block_tables, batch.k_cache.shape[0])
    with pytest.raises(RuntimeError, match="block id"):
        cpu_ops.paged_decode(out, batch.query, batch.k_cache, batch.v_cache, bad_table, meta.decode_seq_lens, 0.1)
    # The fused decode op refuses them before it rotates q/k or writes the cache: nothing changes.
    seqs, heads, kv_heads, dim = batch.query.shape[0], 4, 2, 32
    qkv = torch.randn(seqs, (heads + 2 * kv_heads) * dim)
    positions = meta.decode_seq_lens - 1
    cos, sin = torch.randn(64, dim // 2), torch.randn(64, dim // 2)
    slots = torch.arange(seqs, dtype=torch.long)
    before = qkv.clone(), batch.k_cache.clone(), batch.v_cache.clone()
    for tables, lens, what in ((bad_table, meta.decode_seq_lens, "block id"),
                               (meta.decode_block_tables, too_long.expand(seqs).contiguous(), "seq_lens")):
        with pytest.raises(RuntimeError, match=what):
            cpu_ops.decode_attention(qkv, positions, cos, sin, batch.k_cache, batch.v_cache, slots, tables, lens,
                                     heads, kv_heads, 0.1)
        for a, b in zip((qkv, batch.k_cache, batch.v_cache), before):
            assert torch.equal(a.nan_to_num(), b.nan_to_num())


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_generation_is_the_same_with_and_without_kernels(kernel, family, request, monkeypatch):
    """End to end: greedy tokens and their logprobs do not depend on whether the kernels ran
    (attention and elementwise ops; Qwen3 also has per-head norms, which stay eager)."""
    model_dir = request.getfixturevalue(f"{family}_dir")
    from pagedllm import LLM, SamplingParams

    prompts = ["hello world", "the quick brown fox jumps over", "a"]
    params = SamplingParams(max_tokens=24, temperature=0.0, logprobs=0, ignore_eos=True)
    results = []
    for use_kernel in (True, False):
        if not use_kernel:
            monkeypatch.setattr(cpu_ops, "cpu_kernels_available", lambda: False)
        llm = LLM(model=model_dir, max_model_len=256, block_size=8)
        assert isinstance(llm.llm_engine.model_runner.model.norm.fused_ops, CpuKernelOps) == use_kernel
        try:
            outs = llm.generate(prompts, params, use_tqdm=False)
        finally:
            llm.shutdown()
        results.append([(o.outputs[0].token_ids, [next(iter(lp.values())).logprob for lp in o.outputs[0].logprobs])
                        for o in outs])
    for (tokens_k, lps_k), (tokens_t, lps_t) in zip(*results):
        assert tokens_k == tokens_t
        torch.testing.assert_close(torch.tensor(lps_k), torch.tensor(lps_t), atol=1e-4, rtol=0)


def test_bfloat16_kv_cache_end_to_end(kernel, llama_dir, monkeypatch):
    """kv_cache_dtype='bfloat16' under float32 weights: the cache is bf16 and, for the same byte
    budget, holds twice the blocks; the kernel and the PyTorch path give the same tokens; and the
    logprobs stay within bf16 rounding of a float32 cache's."""
    from pagedllm import LLM, SamplingParams

    prompts = ["hello world", "the quick brown fox jumps over", "a"]
    params = SamplingParams(max_tokens=16, temperature=0.0, logprobs=0, ignore_eos=True)
    runs = {}
    for name, kv_dtype, use_kernel in (("fp32", "auto", True), ("bf16", "bfloat16", True),
                                       ("bf16-torch", "bfloat16", False)):
        if not use_kernel:
            monkeypatch.setattr(cpu_ops, "cpu_kernels_available", lambda: False)
        llm = LLM(model=llama_dir, max_model_len=256, block_size=8, dtype="float32", kv_cache_dtype=kv_dtype,
                  kv_cache_memory_bytes=1 << 20)
        runner = llm.llm_engine.model_runner
        cache_dtype, num_blocks = runner.kv_caches[0][0].dtype, runner.num_blocks
        try:
            outs = llm.generate(prompts, params, use_tqdm=False)
        finally:
            llm.shutdown()
        runs[name] = (cache_dtype, num_blocks,
                      [(o.outputs[0].token_ids, [next(iter(lp.values())).logprob for lp in o.outputs[0].logprobs])
                       for o in outs])
    assert runs["fp32"][0] == torch.float32 and runs["bf16"][0] == torch.bfloat16
    assert runs["bf16"][1] == 2 * (runs["fp32"][1] + 1) - 1  # the budget holds num_blocks + 1 (padding)
    for (tok_k, lp_k), (tok_t, lp_t), (tok_32, lp_32) in zip(runs["bf16"][2], runs["bf16-torch"][2], runs["fp32"][2]):
        assert tok_k == tok_t
        # Looser than with a float32 cache: a K/V value that the two paths compute a rounding
        # error apart can land on either side of a bfloat16 rounding boundary.
        torch.testing.assert_close(torch.tensor(lp_k), torch.tensor(lp_t), atol=1e-3, rtol=0)
        # Against the float32 cache, up to where a near-tie lets the greedy paths part.
        n = next((i for i, (a, b) in enumerate(zip(tok_k, tok_32)) if a != b), len(tok_k))
        assert n >= 4
        torch.testing.assert_close(torch.tensor(lp_k[:n]), torch.tensor(lp_32[:n]), atol=5e-2, rtol=0)


# ----- the elementwise ops ----------------------------------------------------------------------
# float32 agrees to rounding; bfloat16 to one unit in the last place of the stored value
# (both round once per stored value, but reductions and FMAs differ in order).
OP_TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 32, 700])  # one thread and several
def test_norms_and_activation_match_eager(kernel, dtype, rows):
    gen = torch.Generator().manual_seed(rows)
    x, r = (torch.randn(rows, 576, generator=gen).to(dtype) for _ in range(2))
    w = (1 + 0.1 * torch.randn(576, generator=gen)).to(dtype)
    gate_up = (4 * torch.randn(rows, 2 * 1536, generator=gen)).to(dtype)  # SiLU's tails too
    tol = OP_TOL[dtype]
    torch.testing.assert_close(cpu_ops.rms_norm(x, w, 1e-5), fused_ops.rms_norm(x, w, 1e-5), **tol)
    for got, want in zip(cpu_ops.add_rms_norm(x, r, w, 1e-5), fused_ops.add_rms_norm(x, r, w, 1e-5)):
        torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(cpu_ops.silu_and_mul(gate_up), fused_ops.silu_and_mul(gate_up), **tol)


def test_silu_saturates_without_overflow(kernel):
    x = torch.tensor([[-1e4, -100.0, -88.0, 0.0, 88.0, 100.0, 1e4, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    got = cpu_ops.silu_and_mul(x)
    torch.testing.assert_close(got, fused_ops.silu_and_mul(x))
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_matches_eager_in_place_on_qkv_views(kernel, dtype):
    gen = torch.Generator().manual_seed(1)
    tokens, heads, kv_heads, dim, max_pos = 300, 9, 3, 64, 1024
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=gen).to(dtype)
    q = qkv[:, : heads * dim].view(tokens, heads, dim)
    k = qkv[:, heads * dim : (heads + kv_heads) * dim].view(tokens, kv_heads, dim)
    v_before = qkv[:, (heads + kv_heads) * dim :].clone()
    angles = torch.rand(max_pos, dim // 2, generator=gen) * 6.28
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    positions = torch.randint(0, max_pos, (tokens,), generator=gen)
    want_q, want_k = fused_ops.EAGER_OPS.rotary(positions, q.clone(), k.clone(), cos, sin)
    got_q, got_k = cpu_ops.rotary_embedding(positions, q, k, cos, sin)
    assert got_q.data_ptr() == q.data_ptr()  # rotated where they lie
    torch.testing.assert_close(got_q, want_q, **OP_TOL[dtype])
    torch.testing.assert_close(got_k, want_k, **OP_TOL[dtype])
    torch.testing.assert_close(qkv[:, (heads + kv_heads) * dim :], v_before, rtol=0, atol=0)  # V untouched
    with pytest.raises(RuntimeError, match="position 1024 outside"):
        cpu_ops.rotary_embedding(torch.full((tokens,), max_pos), q, k, cos, sin)


def test_kernel_ops_leave_unsupported_shapes_to_eager(kernel):
    # Qwen3's per-head norm runs on a strided 3-D view of the QKV output: the eager op takes it.
    ops = CpuKernelOps()
    qkv = torch.randn(5, 3 * 4 * 16)
    q = qkv[:, : 4 * 16].view(5, 4, 16)
    w = torch.randn(16)
    torch.testing.assert_close(ops.rms_norm(q, w, 1e-6), fused_ops.rms_norm(q, w, 1e-6))
    half = torch.randn(4, 32).half()
    torch.testing.assert_close(ops.silu_and_mul(half), fused_ops.silu_and_mul(half))


def test_cpu_models_get_the_kernel_ops(kernel, monkeypatch):
    cpu = fused_ops.fused_ops_for(torch.device("cpu"), False)
    assert isinstance(cpu, CpuKernelOps) and not cpu.compiled
    compiled = fused_ops.fused_ops_for(torch.device("cpu"), True)
    assert isinstance(compiled, CpuKernelOps) and compiled.compiled
    monkeypatch.setattr(cpu_ops, "cpu_kernels_available", lambda: False)
    assert fused_ops.fused_ops_for(torch.device("cpu"), False) is fused_ops.EAGER_OPS


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("window", "cap"), [(20, None), (None, 5.0), (20, 5.0), (1, None)])
def test_decode_window_and_soft_cap_match_reference(kernel, dtype, window, cap):
    """A local layer (Mistral, Gemma) reads from its window's first block on: the blocks before it hold
    NaN, as the KV-cache manager would have freed them; Gemma 2's soft-cap bends the scores."""
    batch = cached_batch([(c, 1) for c in (0, 15, 19, 20, 40, 100)], 8, 2, 32, 16, dtype)
    if window:
        batch.drop_outside_window(window)
    meta = batch.metadata(batch.slot_mapping)
    out = torch.full_like(batch.query, float("nan"))
    cpu_ops.paged_decode(out, batch.query, batch.k_cache, batch.v_cache, meta.decode_block_tables,
                         meta.decode_seq_lens, 32**-0.5, window, cap)
    torch.testing.assert_close(out.float(), batch.reference(window, cap), atol=ATOL[dtype], rtol=0)


@pytest.mark.parametrize(("window", "cap"), [(20, None), (None, 5.0), (20, 5.0)])
@pytest.mark.parametrize("use_kernel", [True, False])
def test_backend_local_capped_layer_with_and_without_kernel(kernel, monkeypatch, use_kernel, window, cap):
    """A local or soft-capped layer's step: decodes through the kernel or the PyTorch masked path
    (which gathers only the window's blocks), prefills through the masked path (a soft-capped one
    in several row blocks past 256 rows)."""
    if not use_kernel:
        monkeypatch.setattr(cpu_ops, "cpu_kernels_available", lambda: False)
    batch = PagedBatch([(5, 1), (16, 1), (47, 1), (70, 1), (0, 30), (40, 300)], 6, 2, 32, 16, fill=0.0)
    key, value, slots = batch.take_new_kv()
    attn = TorchPagedAttention(6, 2, 32, 32**-0.5, sliding_window=window, logits_soft_cap=cap)
    meta = batch.metadata(slots)
    assert (meta.decode_seq_lens is not None) == use_kernel
    out = attn.forward(batch.query, key, value, (batch.k_cache.nan_to_num(0.0), batch.v_cache.nan_to_num(0.0)), meta)
    torch.testing.assert_close(out, batch.reference(window, cap), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("dtype", "cache_dtype"), [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                                    (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize(("window", "cap"), [(None, None), (20, 5.0)])
def test_fused_decode_step_equals_rotary_then_forward(kernel, dtype, cache_dtype, window, cap):
    """`forward_qkv` (one C++ op: rotary in place, the K/V write, the decode kernel) gives the same
    output and leaves the same cache as the op-by-op path (kernel rotary, then `forward`), exactly;
    a step with a prefill in it is left to that path."""
    heads, kv_heads, dim, max_pos = 6, 2, 32, 512
    batch = PagedBatch([(5, 1), (16, 1), (47, 1), (130, 1)], heads, kv_heads, dim, 16, fill=float("nan"),
                       dtype=dtype, cache_dtype=cache_dtype)
    _, _, slots = batch.take_new_kv()
    meta = batch.metadata(slots)
    assert meta.decode_only
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(4, (heads + 2 * kv_heads) * dim, generator=gen).to(dtype)
    angles = torch.rand(max_pos, dim // 2, generator=gen) * 6.28
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    positions = torch.tensor([5, 16, 47, 130])
    attn = TorchPagedAttention(heads, kv_heads, dim, dim**-0.5, sliding_window=window, logits_soft_cap=cap)

    want_qkv, want_cache = qkv.clone(), (batch.k_cache.clone(), batch.v_cache.clone())
    q, k, v = want_qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    q, k = CpuKernelOps().rotary(positions, q.view(4, heads, dim), k.view(4, kv_heads, dim), cos, sin)
    want = attn.forward(q, k, v.view(4, kv_heads, dim), want_cache, meta).flatten(1)

    got_cache = (batch.k_cache.clone(), batch.v_cache.clone())
    got = attn.forward_qkv(qkv, positions, cos, sin, got_cache, meta)
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(qkv, want_qkv, rtol=0, atol=0)  # rotated in place, as the kernel rotary does
    for got_c, want_c in zip(got_cache, want_cache):
        torch.testing.assert_close(got_c, want_c, rtol=0, atol=0, equal_nan=True)
    with pytest.raises(RuntimeError, match="slot"):
        bad = dataclasses.replace(meta, slot_mapping=torch.full_like(meta.slot_mapping, got_cache[0].numel()))
        attn.forward_qkv(qkv, positions, cos, sin, got_cache, bad)

    mixed = PagedBatch([(5, 1), (0, 9)], heads, kv_heads, dim, 16)
    assert attn.forward_qkv(qkv, positions, cos, sin, got_cache, mixed.metadata(mixed.take_new_kv()[2])) is None
