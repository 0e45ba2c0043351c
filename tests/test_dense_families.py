"""Mistral, Qwen2 with sliding-window layers, Phi-3 (also with Phi-4-mini's partial rotary), Gemma 2 and
Gemma 3 (text) give transformers' greedy tokens and logprobs (float32), with prompts longer than the
sliding window, chunked prefill, forced preemption and prefix-cache hits; local layers keep window-sized
KV memory however long the sequence grows.

The reference is transformers' eager attention on the same tiny random checkpoint (its masks apply
the window; eager is the implementation Gemma 2's soft-capping is defined on).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_preempted_hit_and_freed, metric
from dense_families import SLIDING_WINDOW
from transformers import AutoModelForCausalLM

from pagedllm import LLM, SamplingParams
from pagedllm.model_executor.kv_cache_groups import blocks_for_tokens, kv_cache_groups
from pagedllm.core.sliding_window_manager import SlidingWindowKVCacheManager
from pagedllm.utils import cdiv

MAX_TOKENS = 32
SHARED = [(7 * i) % 300 + 5 for i in range(48)]  # three blocks, two windows' worth
PROMPTS = [
    [5, 17, 42, 99, 7, 250, 13],
    [(11 * i) % 300 + 5 for i in range(40)],  # past the 24-token window from the start
    [(13 * i) % 300 + 5 for i in range(70)],
    SHARED + [101, 102, 103, 104, 105, 106, 107, 108],
    SHARED + [201, 202, 203, 204, 205],
]
# max_model_len 128 in 16-token blocks; a tight pool forces preemptions, a 32-token budget chunks prompts.
ENGINE = dict(max_model_len=128, max_num_batched_tokens=32)
NUM_BLOCKS = {"mistral": 10, "qwen2_sliding": 22, "phi3": 14, "phi3_partial": 14, "gemma2": 22, "gemma3": 30}


def hf_greedy(model, prompt: list[int], max_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    input_ids = torch.tensor([prompt])
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_tokens,
                         do_sample=False, output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, len(prompt):].tolist(), [torch.log_softmax(l[0].float(), dim=-1) for l in out.logits]


def assert_matches_transformers(model_dir: str, prompts: list[list[int]], outputs: list) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model.generation_config.eos_token_id = None  # the engine ran with ignore_eos
    for prompt, output in zip(prompts, outputs):
        expected, ref = hf_greedy(model, prompt, len(output.outputs[0].token_ids))
        completion = output.outputs[0]
        assert completion.token_ids == expected, f"prompt of {len(prompt)} tokens"
        for token, ours, theirs in zip(expected, completion.logprobs, ref):
            assert math.isclose(ours[token].logprob, theirs[token].item(), abs_tol=1e-4)


@pytest.mark.parametrize("family", ["mistral", "qwen2_sliding", "phi3", "phi3_partial", "gemma2", "gemma3"])
def test_greedy_and_logprobs_match_transformers_with_chunks_preemption_and_prefix_hits(family, dense_checkpoint):
    model_dir = dense_checkpoint(family)
    llm = LLM(model=model_dir, num_gpu_blocks_override=NUM_BLOCKS[family], **ENGINE)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=1)
    try:
        rounds = [llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False) for _ in range(2)]
        assert_preempted_hit_and_freed(llm)
    finally:
        llm.shutdown()
    for outputs in rounds:
        assert_matches_transformers(model_dir, PROMPTS, outputs)


def test_phi3_longrope_uses_short_factors_within_and_long_factors_past_the_original_context(dense_checkpoint):
    """transformers picks LongRoPE's factors by the running sequence's length; pagedllm (as vLLM) by
    max_model_len: both agree when every sequence stays within the original 64 tokens, or runs past it
    from its first step."""
    model_dir = dense_checkpoint("phi3_longrope")
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=1)
    for max_model_len, prompts in ((64, PROMPTS[:2]), (256, [PROMPTS[2], SHARED + PROMPTS[1]])):
        llm = LLM(model=model_dir, max_model_len=max_model_len)
        try:
            outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        finally:
            llm.shutdown()
        assert_matches_transformers(model_dir, prompts, outputs)


def test_local_layers_keep_window_sized_kv_memory_as_the_sequence_grows(dense_checkpoint):
    """Gemma 3 (three local layers, one global): the global group's blocks grow with the sequence, each
    local group's stay bounded by the window, and the output is still transformers'."""
    llm = LLM(model=dense_checkpoint("gemma3"), max_model_len=256, max_num_batched_tokens=16)
    engine = llm.llm_engine
    manager = engine.engine_core.core.kv_cache_manager
    assert isinstance(manager, SlidingWindowKVCacheManager)
    windows = [g.sliding_window for g in manager.groups]
    assert windows.count(None) == 1 and windows.count(SLIDING_WINDOW) == 3
    bound = blocks_for_tokens(SLIDING_WINDOW, 10**6, 16, chunk_tokens=16)  # 23 keys + a 16-token chunk: 4 blocks
    engine.add_request("long", {"prompt_token_ids": PROMPTS[1]},
                       SamplingParams(temperature=0.0, max_tokens=160, ignore_eos=True))
    peak_local, final = 0, None
    while engine.has_unfinished_requests():
        for out in engine.step():
            final = out
        held = manager.num_group_blocks("long")
        if held:
            request = engine.engine_core.core.scheduler.requests["long"]
            global_blocks = [n for n, w in zip(held, windows) if w is None]
            assert global_blocks == [cdiv(request.num_computed_tokens + 1, 16)] or \
                global_blocks == [cdiv(request.num_computed_tokens, 16)]
            peak_local = max(peak_local, *(n for n, w in zip(held, windows) if w is not None))
    llm.shutdown()
    assert len(final.outputs[0].token_ids) == 160
    assert 0 < peak_local <= bound < cdiv(len(PROMPTS[1]) + 160, 16)


def test_kv_cache_groups_pair_local_and_global_layers():
    # Gemma 3's 5:1 pattern over 26 layers: 22 local, 4 global -> 13 groups of 2 layers.
    windows = [None if i % 6 == 5 else 512 for i in range(26)]
    groups = kv_cache_groups(windows)
    assert len(groups) == 13 and {len(g.layer_ids) for g in groups} == {2}
    assert [g.layer_ids for g in groups if g.sliding_window is None] == [(5, 11), (17, 23)]
    assert kv_cache_groups([None] * 4)[0].layer_ids == (0, 1, 2, 3)
    assert len(kv_cache_groups([512] * 4)) == 1  # Mistral: one local group



@pytest.mark.parametrize("family", ["gemma2", pytest.param("mistral", marks=pytest.mark.slow)])
def test_triton_backend_matches_transformers_on_local_and_capped_layers(family, dense_checkpoint, monkeypatch):
    """The Triton kernels' window and soft-cap (under Triton's interpreter without a GPU), through the
    per-group block tables, chunked prefill and a prefix-cache hit."""
    pytest.importorskip("triton")
    from pagedllm.attention.triton_paged_attention import TritonPagedAttention

    monkeypatch.setenv("PAGEDLLM_ATTENTION_BACKEND", "triton")
    model_dir = dense_checkpoint(family)
    prompts = [PROMPTS[2], PROMPTS[3], PROMPTS[4]]
    llm = LLM(model=model_dir, dtype="float32", **ENGINE)
    try:
        assert isinstance(llm.llm_engine.model_runner.model.layers[0].self_attn.attn, TritonPagedAttention)
        params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=1)
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        assert metric(llm, "prefix_cache_hits") > 0
    finally:
        llm.shutdown()
    assert_matches_transformers(model_dir, prompts, outputs)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_prompt_logprobs_past_the_window_in_chunks_match_transformers(family, dense_checkpoint):
    """Every prompt position's logprob, the prompt fed 16 tokens a step: each chunk's local layers
    read the window across the chunk boundary (and through freed blocks' null entries)."""
    model_dir = dense_checkpoint(family)
    prompt = PROMPTS[2]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    ref = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), dim=-1)
    llm = LLM(model=model_dir, max_model_len=128, max_num_batched_tokens=16)
    try:
        out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=1, prompt_logprobs=1),
                           use_tqdm=False)[0]
    finally:
        llm.shutdown()
    for pos in range(1, len(prompt)):
        assert math.isclose(out.prompt_logprobs[pos][prompt[pos]].logprob, ref[pos - 1, prompt[pos]].item(),
                            abs_tol=1e-4), pos
