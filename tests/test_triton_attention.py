"""The Triton attention kernels and backend agree with PyTorch.

Without a GPU the kernels run under Triton's interpreter (`TRITON_INTERPRET=1`, which must be
set before triton is imported: conftest.py does it), so shapes stay tiny; tile sizes are shrunk
so that even tiny shapes cross several tiles, splits and KV-cache blocks. With a GPU the same
tests run the compiled kernels. Every cache slot a kernel must not read holds NaN, so a masking mistake
shows up as NaN in the output rather than as a small error.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":
    if "triton" in sys.modules:  # too late: triton built its own helpers for compiling, not interpreting
        pytest.skip("TRITON_INTERPRET=1 must be set before triton is imported (conftest.py does)",
                    allow_module_level=True)
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from pagedllm.attention.ops import paged_decode, prefix_prefill, reshape_and_cache  # noqa: E402
from pagedllm.attention.testing import PagedBatch  # noqa: E402
from pagedllm.attention.torch_paged_attention import TorchPagedAttention, TorchPagedAttentionBackend  # noqa: E402
from pagedllm.attention.triton_paged_attention import TritonPagedAttention, TritonPagedAttentionBackend  # noqa: E402

DEVICE = torch.device("cuda" if ON_GPU else "cpu")
# Small tiles: several key tiles and query tiles even for sequences of a few dozen tokens.
TILE = dict(block_m=16, block_n=16)
ATOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def run_prefill(batch: PagedBatch) -> torch.Tensor:
    query = batch.query
    out = torch.full_like(query, float("nan"))
    prefix_prefill(
        out, query, batch.k_cache, batch.v_cache, batch.block_tables, batch.query_start_loc, batch.seq_lens,
        batch.max_query_len, batch.head_dim**-0.5, **TILE,
    )
    return out


def run_decode(batch: PagedBatch, num_splits: int | None) -> torch.Tensor:
    """Decode attention for a batch whose sequences all have query_len 1."""
    query = batch.query
    out = torch.full_like(query, float("nan"))
    paged_decode(
        out, query, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens,
        batch.max_seq_len, batch.head_dim**-0.5, num_splits=num_splits, tile_n=16,
    )
    return out


def assert_close(out: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = torch.float32) -> None:
    assert not out.isnan().any(), "the kernel read a slot it should not have"
    torch.testing.assert_close(out.float(), expected, atol=ATOL[dtype], rtol=0)


# ----- reshape_and_cache ------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_size", [16, 32])
def test_reshape_and_cache_writes_exactly_the_slots(dtype, block_size):
    num_blocks, num_kv_heads, head_dim = 4, 2, 48  # head_dim not a power of two: padded and masked
    gen = torch.Generator().manual_seed(block_size)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:9]
    slots[4] = -1  # a padding row: written nowhere
    key = torch.randn(9, num_kv_heads, head_dim, generator=gen).to(dtype)
    # Value rows as a strided view, as the model passes them (a slice of the fused QKV output).
    value = torch.randn(9, 3 * num_kv_heads, head_dim, generator=gen).to(dtype)[:, num_kv_heads : 2 * num_kv_heads]
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    for row, slot in enumerate(slots.tolist()):
        if slot >= 0:
            expected_k[slot // block_size, slot % block_size] = key[row]
            expected_v[slot // block_size, slot % block_size] = value[row]

    k_cache, v_cache = k_cache.to(DEVICE), v_cache.to(DEVICE)
    reshape_and_cache(key.to(DEVICE), value.to(DEVICE), k_cache, v_cache, slots.to(DEVICE))
    assert torch.equal(k_cache.cpu(), expected_k)
    assert torch.equal(v_cache.cpu(), expected_v)


# ----- prefill ----------------------------------------------------------------------------
HEADS = {"gqa": (4, 2), "mha": (2, 2), "mqa": (4, 1)}


@pytest.mark.parametrize(("block_size", "heads", "head_dim"), [(16, "gqa", 32), (32, "mha", 64), (16, "mqa", 128)])
def test_prefill_without_prefix_matches_sdpa(block_size, heads, head_dim):
    # Fresh prompts of several lengths: shorter than a tile, crossing blocks and query tiles.
    seqs = [(0, 37), (0, 5), (0, 16)]
    batch = PagedBatch(seqs, *HEADS[heads], head_dim, block_size, device=DEVICE)
    assert_close(run_prefill(batch), batch.reference())


@pytest.mark.parametrize(("block_size", "heads"), [(16, "gqa"), (32, "mqa")])
def test_prefill_with_cached_prefix_matches_sdpa(block_size, heads):
    # A prefix-cache hit covers whole blocks; the rest of the prompt attends to it through the table.
    seqs = [(block_size, 21), (2 * block_size, 3)]
    batch = PagedBatch(seqs, *HEADS[heads], 32, block_size, device=DEVICE)
    assert_close(run_prefill(batch), batch.reference())


@pytest.mark.parametrize("block_size", [16, 32])
def test_chunked_prefill_matches_sdpa(block_size):
    # Later chunks of a prompt: their context ends mid-block, and the chunk may end mid-block too.
    seqs = [(21, 19), (7, 2), (40, 33)]
    batch = PagedBatch(seqs, 4, 2, 32, block_size, device=DEVICE)
    assert_close(run_prefill(batch), batch.reference())


def test_prefill_pads_head_dim_that_is_not_a_power_of_two():
    batch = PagedBatch([(10, 12)], 4, 2, 80, 16, device=DEVICE)
    assert_close(run_prefill(batch), batch.reference())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prefill_half_precision_accumulates_in_fp32(dtype):
    seqs = [(16, 20), (0, 9)]
    batch = PagedBatch(seqs, 4, 2, 64, 16, dtype=dtype, device=DEVICE)
    out = run_prefill(batch)
    assert out.dtype == dtype
    assert_close(out, batch.reference(), dtype)


# ----- decode -----------------------------------------------------------------------------
DECODE_SEQS = [(70, 1), (0, 1), (15, 1), (32, 1)]  # a long one, a first token, block boundaries


@pytest.mark.parametrize(("block_size", "heads"), [(16, "gqa"), (32, "mha"), (16, "mqa")])
def test_decode_without_splitting_matches_sdpa(block_size, heads):
    batch = PagedBatch(DECODE_SEQS, *HEADS[heads], 32, block_size, device=DEVICE)
    assert_close(run_decode(batch, num_splits=1), batch.reference())


@pytest.mark.parametrize(("block_size", "num_splits"), [(16, 2), (32, 3), (16, 8)])
def test_decode_split_across_programs_matches_sdpa(block_size, num_splits):
    # 8 splits of 16-key tiles: short sequences leave some splits empty, which the reduction skips.
    batch = PagedBatch(DECODE_SEQS, 4, 2, 64, block_size, device=DEVICE)
    assert_close(run_decode(batch, num_splits=num_splits), batch.reference())


@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_pads_head_dim_and_group(num_splits):
    # head_dim 80 (padded to 128) and 3 query heads per KV head (padded to 16 rows).
    batch = PagedBatch([(50, 1), (3, 1)], 6, 2, 80, 16, device=DEVICE)
    assert_close(run_decode(batch, num_splits=num_splits), batch.reference())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_half_precision_accumulates_in_fp32(dtype):
    batch = PagedBatch(DECODE_SEQS, 4, 2, 32, 16, dtype=dtype, device=DEVICE)
    out = run_decode(batch, num_splits=2)
    assert out.dtype == dtype
    assert_close(out, batch.reference(), dtype)


# ----- the backend on a mixed batch ---------------------------------------------------------
@pytest.mark.parametrize("block_size", [16, 32])
def test_backend_mixed_batch_matches_torch_backend(block_size):
    """Decodes and prefills in one step, this step's K/V written first, as the model calls it."""
    batch = PagedBatch([(40, 1), (9, 1), (0, 23), (block_size, 6), (19, 11)], 4, 2, 32, block_size, device=DEVICE)
    key, value, slot_mapping = batch.take_new_kv()
    # Each backend gets the metadata its own builder makes of the same batch.
    torch_meta = batch.metadata(slot_mapping, TorchPagedAttentionBackend)
    triton_meta = batch.metadata(slot_mapping, TritonPagedAttentionBackend)
    # The torch backend reads (and masks) whole blocks, so it needs finite values in unused slots.
    torch_cache = (batch.k_cache.nan_to_num(0.0), batch.v_cache.nan_to_num(0.0))
    expected = TorchPagedAttention(4, 2, 32, 32**-0.5).forward(batch.query, key, value, torch_cache, torch_meta)
    triton_cache = (batch.k_cache, batch.v_cache)
    out = TritonPagedAttention(4, 2, 32, 32**-0.5).forward(batch.query, key, value, triton_cache, triton_meta)
    assert_close(out, expected)
    assert_close(out, batch.reference())
    # Both backends wrote exactly this step's slots.
    for ours, theirs in zip(triton_cache, torch_cache):
        assert torch.equal(ours.nan_to_num(0.0), theirs)


@pytest.mark.parametrize("query_dtype", [torch.float32, torch.float16])
def test_backend_reads_and_writes_a_bfloat16_cache(query_dtype):
    """kv_cache_dtype='bfloat16' under float32 (or float16) compute: this step's K/V are rounded
    into the bf16 cache, and every kernel reads it back in the query's dtype."""
    seqs = [(40, 1), (9, 1), (0, 23), (16, 6), (19, 11)]
    batch = PagedBatch(seqs, 4, 2, 32, 16, dtype=query_dtype, device=DEVICE, cache_dtype=torch.bfloat16)
    key, value, slot_mapping = batch.take_new_kv()
    cache = (batch.k_cache, batch.v_cache)
    out = TritonPagedAttention(4, 2, 32, 32**-0.5).forward(batch.query, key, value, cache,
                                                          batch.metadata(slot_mapping, TritonPagedAttentionBackend))
    assert out.dtype == query_dtype and batch.k_cache.dtype == torch.bfloat16
    assert_close(out, batch.reference(), query_dtype)
    flat = batch.k_cache.view(-1, 2, 32)
    assert torch.equal(flat[slot_mapping].to(query_dtype), key)


@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_backend_reads_and_writes_an_fp8_cache(cache_dtype):
    """kv_cache_dtype='fp8' / 'fp8_e5m2' with per-layer scales: this step's K/V are stored divided by
    k_scale / v_scale, and every kernel reads them back times the scales."""
    seqs = [(40, 1), (9, 1), (0, 23), (16, 6), (19, 11)]
    batch = PagedBatch(seqs, 4, 2, 32, 16, device=DEVICE, cache_dtype=cache_dtype, k_scale=0.5, v_scale=2.0)
    key, value, slot_mapping = batch.take_new_kv()
    attn = TritonPagedAttention(4, 2, 32, 32**-0.5)
    attn.k_scale, attn.v_scale = 0.5, 2.0
    out = attn.forward(batch.query, key, value, (batch.k_cache, batch.v_cache),
                       batch.metadata(slot_mapping, TritonPagedAttentionBackend))
    assert_close(out, batch.reference(), torch.float32)
    assert torch.equal(batch.k_cache.view(-1, 2, 32)[slot_mapping].float(), key / 0.5)
    assert torch.equal(batch.v_cache.view(-1, 2, 32)[slot_mapping].float(), value / 2.0)


def test_backend_ignores_kv_scales_for_a_wider_cache():
    """k_scale/v_scale (loaded from a checkpoint whatever kv_cache_dtype is) mean nothing to a float cache."""
    seqs = [(40, 1), (9, 1), (0, 23), (16, 6)]
    batch = PagedBatch(seqs, 4, 2, 32, 16, device=DEVICE)
    key, value, slot_mapping = batch.take_new_kv()
    attn = TritonPagedAttention(4, 2, 32, 32**-0.5)
    attn.k_scale, attn.v_scale = 0.03, 0.02
    out = attn.forward(batch.query, key, value, (batch.k_cache, batch.v_cache),
                       batch.metadata(slot_mapping, TritonPagedAttentionBackend))
    assert_close(out, batch.reference(), torch.float32)


# ----- local (sliding-window) and soft-capped layers (Mistral, Gemma 2/3) ------------------------
LOCAL = [(20, None), (None, 5.0), (20, 5.0)]  # (sliding_window, soft_cap)


@pytest.mark.parametrize(("window", "cap"), LOCAL)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_window_and_soft_cap_match_reference(window, cap, num_splits):
    """The blocks a window has left hold NaN, as if freed: the kernel must not read them."""
    batch = PagedBatch([(40, 1), (9, 1), (70, 1)], 4, 2, 32, 16, device=DEVICE)
    if window:
        batch.drop_outside_window(window)
    out = torch.full_like(batch.query, float("nan"))
    paged_decode(out, batch.query, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens,
                 batch.max_seq_len, batch.head_dim**-0.5, num_splits=num_splits, tile_n=16,
                 sliding_window=window, soft_cap=cap)
    assert_close(out, batch.reference(window, cap))


@pytest.mark.parametrize(("window", "cap"), LOCAL)
def test_prefill_window_and_soft_cap_match_reference(window, cap):
    batch = PagedBatch([(0, 45), (30, 20), (16, 6)], 4, 2, 32, 16, device=DEVICE)
    if window:
        batch.drop_outside_window(window)
    out = torch.full_like(batch.query, float("nan"))
    prefix_prefill(out, batch.query, batch.k_cache, batch.v_cache, batch.block_tables, batch.query_start_loc,
                   batch.seq_lens, batch.max_query_len, batch.head_dim**-0.5, sliding_window=window, soft_cap=cap,
                   **TILE)
    assert_close(out, batch.reference(window, cap))


@pytest.mark.parametrize(("window", "cap"), LOCAL)
def test_both_backends_on_a_local_capped_layer_match_reference(window, cap):
    """A mixed step through each backend's own layer: the torch backend's masked path and Triton's."""
    batch = PagedBatch([(40, 1), (9, 1), (0, 23), (16, 6), (50, 11)], 4, 2, 32, 16, device=DEVICE)
    if window:
        batch.drop_outside_window(window)
    key, value, slot_mapping = batch.take_new_kv()
    expected = batch.reference(window, cap)
    torch_cache = (batch.k_cache.nan_to_num(0.0), batch.v_cache.nan_to_num(0.0))
    torch_layer = TorchPagedAttention(4, 2, 32, 32**-0.5, sliding_window=window, logits_soft_cap=cap)
    out = torch_layer.forward(batch.query, key, value, torch_cache, batch.metadata(slot_mapping))
    assert_close(out, expected)
    triton_layer = TritonPagedAttention(4, 2, 32, 32**-0.5, sliding_window=window, logits_soft_cap=cap)
    out = triton_layer.forward(batch.query, key, value, (batch.k_cache, batch.v_cache),
                               batch.metadata(slot_mapping, TritonPagedAttentionBackend))
    assert_close(out, expected)


# ----- end to end ---------------------------------------------------------------------------
PREFIX = "Continuous batching lets new requests join while others are still decoding. Prefix caching shares blocks"
PROMPTS = [PREFIX + " between prompts.", PREFIX + " with the same beginning.", "Hello, my name is", "a"]


@pytest.mark.parametrize(("family", "block_size"), [("llama", 16), ("qwen3", 32)])
def test_triton_backend_generates_same_greedy_tokens_as_torch(family, block_size, request, monkeypatch):
    """Greedy tokens and logprobs agree; the token budget forces chunked prefill and mixed
    decode + prefill steps, and the second round reuses the shared prefix from the cache."""
    from pagedllm import LLM, SamplingParams

    model_dir = request.getfixturevalue(f"{family}_dir")
    params = SamplingParams(temperature=0.0, max_tokens=12, logprobs=2)
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("PAGEDLLM_ATTENTION_BACKEND", backend)
        llm = LLM(model=model_dir, max_model_len=256, block_size=block_size, max_num_batched_tokens=24,
                  dtype="float32")
        attn = llm.llm_engine.model_runner.model.layers[0].self_attn.attn
        assert isinstance(attn, {"torch": TorchPagedAttention, "triton": TritonPagedAttention}[backend])
        results[backend] = [llm.generate(PROMPTS, params, use_tqdm=False) for _ in range(2)]
        llm.shutdown()
    for torch_round, triton_round in zip(results["torch"], results["triton"]):
        for expected, got in zip(torch_round, triton_round):
            expected, got = expected.outputs[0], got.outputs[0]
            assert got.token_ids == expected.token_ids
            for token, lp_expected, lp_got in zip(expected.token_ids, expected.logprobs, got.logprobs):
                assert lp_got[token].logprob == pytest.approx(lp_expected[token].logprob, abs=1e-4)
