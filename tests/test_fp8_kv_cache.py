"""kv_cache_dtype="fp8" / "fp8_e4m3" / "fp8_e5m2": K/V stored as 8-bit floats with per-layer scales.

The references: PyTorch's own float8 conversions for what is stored, the SDPA reference of
`PagedBatch` (K/V drawn representable in the cache, so it is exact) for the attention paths, a
float32 KV cache for whole generations, and the checkpoint's values for loaded scales.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from pagedllm import LLM, SamplingParams, cpu_ops
from pagedllm.attention.kv_quant import from_cache, to_cache, write_scaled
from pagedllm.attention.testing import PagedBatch
from pagedllm.attention.torch_paged_attention import TorchPagedAttention

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]
ATOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", FP8)
def test_stored_values_are_scaled_rounded_and_saturated(dtype):
    x = torch.tensor([0.0, 0.3, -1.7, 3.14159, 1e6, -1e6, 100.0])
    stored = to_cache(x, dtype, scale=0.5)
    limit = torch.finfo(dtype).max
    # x / 0.5, rounded by PyTorch's own conversion; out-of-range values clipped to the largest finite value.
    expected = (x / 0.5).clamp(-limit, limit).to(dtype)
    assert stored.dtype == dtype and torch.equal(stored.view(torch.uint8), expected.view(torch.uint8))
    assert torch.isfinite(stored.float()).all() and stored.float()[4].item() == limit
    back = from_cache(stored, torch.float32, scale=0.5)
    assert torch.equal(back, expected.float() * 0.5)
    # Within fp8's relative rounding (3 mantissa bits for e4m3, 2 for e5m2) where nothing saturated.
    rel = 2.0 ** -(4 if dtype == torch.float8_e4m3fn else 3)
    kept = x.abs() < 100
    assert ((back - x).abs()[kept] <= rel * x.abs()[kept] + 1e-6).all()


def test_write_scatters_into_the_right_slots():
    k_cache = torch.zeros(4, 2, 1, 3, dtype=torch.float8_e4m3fn)
    v_cache = torch.zeros_like(k_cache)
    key, value = torch.tensor([[[1.0, 2.0, 3.0]], [[4.0, 5.0, 6.0]]]), torch.tensor([[[-1.0, 0.5, 8.0]]] * 2)
    write_scaled(key, value, k_cache, v_cache, torch.tensor([5, 2]), k_scale=2.0, v_scale=0.25)
    flat_k, flat_v = k_cache.view(-1, 1, 3).float(), v_cache.view(-1, 1, 3).float()
    assert torch.equal(flat_k[5], key[0] / 2) and torch.equal(flat_k[2], key[1] / 2)
    assert torch.equal(flat_v[5], value[0] / 0.25) and flat_k[[0, 1, 3, 4, 6, 7]].abs().sum() == 0


@pytest.mark.parametrize("cache_dtype", FP8)
@pytest.mark.parametrize("query_dtype", [torch.float32, torch.bfloat16])
def test_decode_kernel_reads_an_fp8_cache(kernel, cache_dtype, query_dtype):
    """The C++ decode kernel widens fp8 bytes through its table and applies k_scale / v_scale."""
    batch = PagedBatch([(c, 1) for c in (0, 15, 16, 17, 100)], 8, 2, 64, 16, dtype=query_dtype,
                       cache_dtype=cache_dtype, k_scale=0.5, v_scale=4.0)
    key, value, slots = batch.take_new_kv()
    write_scaled(key, value, batch.k_cache, batch.v_cache, slots, 0.5, 4.0)
    meta = batch.metadata(slots)
    assert meta.decode_seq_lens is not None, "the kernel path should be taken"
    out = torch.full_like(batch.query, float("nan"))
    cpu_ops.paged_decode(out, batch.query, batch.k_cache, batch.v_cache, meta.decode_block_tables,
                         meta.decode_seq_lens, 64**-0.5, k_scale=0.5, v_scale=4.0)
    assert out.dtype == query_dtype and not out.isnan().any()
    torch.testing.assert_close(out.float(), batch.reference(), atol=ATOL[query_dtype] * 4, rtol=0)


@pytest.mark.parametrize("cache_dtype", FP8)
def test_decode_kernel_widens_every_fp8_value_as_pytorch(kernel, cache_dtype):
    """One cached key, so the output is its value row times v_scale: a row holding every fp8 byte (NaN codes
    excepted: writes saturate, so the cache never holds them) must read as PyTorch converts it."""
    codes = torch.arange(256, dtype=torch.uint8)
    finite = torch.isfinite(codes.view(cache_dtype).float())
    row = torch.where(finite, codes, torch.zeros_like(codes)).view(cache_dtype)  # head_dim 256
    v_cache = row.view(1, 1, 1, 256).clone()
    k_cache = torch.zeros_like(v_cache)
    out = torch.empty(1, 1, 256)
    cpu_ops.paged_decode(out, torch.randn(1, 1, 256), k_cache, v_cache, torch.zeros(1, 1, dtype=torch.long),
                         torch.ones(1, dtype=torch.long), 0.0625, v_scale=2.0)
    assert torch.equal(out[0, 0], row.float() * 2.0)


@pytest.mark.parametrize("cache_dtype", FP8)
@pytest.mark.parametrize("use_kernel", [True, False])
@pytest.mark.parametrize("local", [False, True])
def test_backend_mixed_batch_over_an_fp8_cache(kernel, monkeypatch, cache_dtype, use_kernel, local):
    """Decodes (kernel or gather + SDPA) and prefills (fresh and behind a cached prefix) in one step over
    an fp8 cache with non-unit scales; a sliding-window, soft-capped layer takes the masked paths."""
    if not use_kernel:
        monkeypatch.setattr(cpu_ops, "cpu_kernels_available", lambda: False)
    seqs = [(5, 1), (16, 1), (47, 1), (0, 9), (20, 7)]
    batch = PagedBatch(seqs, 6, 2, 32, 16, fill=float("nan") if use_kernel else 0.0, cache_dtype=cache_dtype,
                       k_scale=2.0, v_scale=0.5)
    key, value, slots = batch.take_new_kv()
    window, cap = (12, 5.0) if local else (None, None)
    attn = TorchPagedAttention(6, 2, 32, 32**-0.5, sliding_window=window, logits_soft_cap=cap)
    attn.k_scale, attn.v_scale = 2.0, 0.5
    out = attn.forward(batch.query, key, value, (batch.k_cache, batch.v_cache), batch.metadata(slots))
    assert not out.isnan().any()
    torch.testing.assert_close(out, batch.reference(sliding_window=window, soft_cap=cap), atol=1e-5, rtol=0)
    # What was written is the new K / k_scale, as stored.
    stored = batch.k_cache.view(-1, 2, 32)[slots].float()
    assert torch.equal(stored, key / 2.0)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_kernel", [True, False])
def test_scales_mean_nothing_to_a_wider_cache(kernel, monkeypatch, cache_dtype, use_kernel):
    """A checkpoint's k_scale/v_scale are loaded whatever kv_cache_dtype is; a float32 or bfloat16 cache
    must ignore them on every path (kernel, gather, masked)."""
    if not use_kernel:
        monkeypatch.setattr(cpu_ops, "cpu_kernels_available", lambda: False)
    seqs = [(5, 1), (47, 1), (0, 9), (20, 7)]
    for window in (None, 12):
        batch = PagedBatch(seqs, 6, 2, 32, 16, fill=float("nan") if use_kernel else 0.0, cache_dtype=cache_dtype)
        key, value, slots = batch.take_new_kv()
        attn = TorchPagedAttention(6, 2, 32, 32**-0.5, sliding_window=window)
        attn.k_scale, attn.v_scale = 0.03, 0.02
        out = attn.forward(batch.query, key, value, (batch.k_cache, batch.v_cache), batch.metadata(slots))
        torch.testing.assert_close(out, batch.reference(sliding_window=window), atol=1e-5, rtol=0)


def _hf_fp8_logprobs(model_dir: str, token_ids: list[int], cache_dtype: torch.dtype, fresh: int,
                     k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """transformers' float32 log-softmax at every position, with attention reading K/V as the engine does:
    queries of the first `fresh` positions (a prompt's first chunk, nothing cached before it) see the K/V
    as computed; every later query sees all keys and values rounded through the fp8 cache and its scales."""
    from transformers import AttentionInterface, AutoModelForCausalLM
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def fp8_cache_attention(module, query, key, value, attention_mask, **kwargs):
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        rounded_k, rounded_v = (from_cache(to_cache(t, cache_dtype, sc), t.dtype, sc)
                                for t, sc in ((key, k_scale), (value, v_scale)))
        out_rounded, _ = sdpa_attention_forward(module, query, rounded_k, rounded_v, attention_mask, **kwargs)
        out[:, fresh:] = out_rounded[:, fresh:]  # [batch, seq, heads, dim]
        return out, None

    AttentionInterface.register("fp8_cache_reference", fp8_cache_attention)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32,
                                                 attn_implementation="fp8_cache_reference")
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([token_ids])).logits[0].float(), dim=-1)


PROMPT_IDS = [[5, 17, 33, 2, 90, 41, 7, 250, 13, 64, 8, 77], [300, 12, 45]]
PARAMS = SamplingParams(max_tokens=12, temperature=0.0, logprobs=0, ignore_eos=True)


def _generate(model_dir: str, kv_dtype: str, **kw):
    llm = LLM(model=model_dir, max_model_len=256, block_size=8, dtype="float32", kv_cache_dtype=kv_dtype,
              kv_cache_memory_bytes=1 << 20, **kw)
    runner = llm.llm_engine.model_runner
    cache = (runner.kv_caches[0][0].dtype, runner.num_blocks, runner.model.layers[0].self_attn.attn)
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPT_IDS], PARAMS, use_tqdm=False)
        return cache, [(o.outputs[0].token_ids, [next(iter(lp.values())).logprob for lp in o.outputs[0].logprobs])
                       for o in outs]
    finally:
        llm.shutdown()


def _assert_matches_reference(model_dir, run, cache_dtype, k_scale=1.0, v_scale=1.0):
    """Each generated token's logprob equals the reference's at that position (teacher-forced on the
    engine's own tokens, so a near-tie cannot make the comparison part ways)."""
    for prompt, (tokens, logprobs) in zip(PROMPT_IDS, run):
        ref = _hf_fp8_logprobs(model_dir, prompt + tokens, cache_dtype, fresh=len(prompt),
                               k_scale=k_scale, v_scale=v_scale)
        expected = [ref[len(prompt) - 1 + i, t].item() for i, t in enumerate(tokens)]
        torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(expected), atol=2e-3, rtol=0)
        # and greedy: each token is the reference's argmax, unless within rounding of a tie
        for i, t in enumerate(tokens):
            row = ref[len(prompt) - 1 + i]
            assert row[t] >= row.max() - 2e-3


@pytest.mark.parametrize("kv_dtype, torch_dtype", [("fp8", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)])
def test_fp8_kv_cache_end_to_end(kernel, llama_dir, monkeypatch, kv_dtype, torch_dtype):
    """The cache is fp8 and, for the same byte budget, holds four times a float32 cache's blocks; the
    kernel and the PyTorch path give transformers' logprobs with K/V rounded as the cache stores them."""
    (dtype32, blocks32, _), _ = _generate(llama_dir, "auto")
    (dtype8, blocks8, _), run = _generate(llama_dir, kv_dtype)
    assert dtype32 == torch.float32 and dtype8 == torch_dtype
    assert blocks8 == 4 * (blocks32 + 1) - 1  # the budget holds num_blocks + 1 (padding)
    _assert_matches_reference(llama_dir, run, torch_dtype)
    monkeypatch.setattr(cpu_ops, "cpu_kernels_available", lambda: False)
    _, run_torch = _generate(llama_dir, kv_dtype)
    _assert_matches_reference(llama_dir, run_torch, torch_dtype)


def test_checkpoint_kv_scales_are_loaded_and_used(kernel, llama_dir, tmp_path):
    """A checkpoint's `self_attn.k_scale` / `v_scale` (vLLM's names) become the layers' scales: the cache
    holds K / k_scale, and the logprobs are transformers' with K/V rounded under those scales."""
    scaled = tmp_path / "scaled"
    scaled.mkdir()
    for name in os.listdir(llama_dir):
        if not name.endswith(".safetensors"):
            os.symlink(os.path.join(llama_dir, name), scaled / name)
    tensors = load_file(os.path.join(llama_dir, "model.safetensors"))
    num_layers = json.load(open(os.path.join(llama_dir, "config.json")))["num_hidden_layers"]
    for i in range(num_layers):
        tensors[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor(0.03)
        tensors[f"model.layers.{i}.self_attn.v_scale"] = torch.tensor(0.02)
    save_file(tensors, str(scaled / "model.safetensors"))
    (_, _, attn), run = _generate(str(scaled), "fp8")
    assert (attn.k_scale, attn.v_scale) == pytest.approx((0.03, 0.02))
    _assert_matches_reference(str(scaled), run, torch.float8_e4m3fn, k_scale=attn.k_scale, v_scale=attn.v_scale)

    tensors["model.layers.0.self_attn.v_scale"] = torch.tensor(0.0)
    save_file(tensors, str(scaled / "model.safetensors"))
    with pytest.raises(ValueError, match="KV-cache scale .* must be positive"):
        LLM(model=str(scaled), max_model_len=256, kv_cache_dtype="fp8")
