"""The paged machinery must not change results: prefix caching, preemption, chunked prefill, batching."""

from __future__ import annotations

import pytest

from conftest import metric

from pagedllm import LLM, SamplingParams

SHARED = "Continuous batching lets new requests join while others are still decoding. " * 3
PROMPTS = [SHARED + tail for tail in ("The capital", "Hello, my name", "Prefix caching", "def add(a, b):")] + [
    "The capital of France is Paris.",
    "naïve café",
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)


def run(model_dir: str, prompts=PROMPTS, **kwargs) -> tuple[list[list[int]], LLM]:
    llm = LLM(model=model_dir, **{"max_model_len": 256, **kwargs})
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], llm


def assert_all_blocks_free(llm: LLM) -> None:
    pool = llm.llm_engine.engine_core.core.kv_cache_manager.block_pool
    assert all(b.ref_cnt == 0 for b in pool.blocks)
    assert pool.num_free_blocks == pool.num_blocks


@pytest.fixture(scope="module")
def reference(llama_dir) -> list[list[int]]:
    tokens, llm = run(llama_dir, enable_prefix_caching=False)
    assert_all_blocks_free(llm)
    llm.shutdown()
    return tokens


def test_prefix_cache_hit_gives_same_tokens(llama_dir, reference):
    tokens, llm = run(llama_dir)
    # Run again: now every shared prefix is in the cache.
    again = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    assert tokens == reference and again == reference
    assert metric(llm, "prefix_cache_hits") > 0
    assert metric(llm, "prefix_cache_hits") <= metric(llm, "prefix_cache_queries")
    assert_all_blocks_free(llm)
    llm.shutdown()


def test_preemption_under_small_kv_cache_gives_same_tokens(llama_dir, reference):
    # 12 blocks of 16 tokens cannot hold six ~70-token requests at once.
    tokens, llm = run(llama_dir, num_gpu_blocks_override=12, max_model_len=192)
    assert tokens == reference
    assert metric(llm, "num_preemptions") > 0
    assert_all_blocks_free(llm)
    llm.shutdown()


def test_preemption_without_prefix_caching(llama_dir, reference):
    tokens, llm = run(llama_dir, num_gpu_blocks_override=12, max_model_len=192, enable_prefix_caching=False)
    assert tokens == reference
    assert metric(llm, "num_preemptions") > 0
    llm.shutdown()


def test_chunked_prefill_under_small_token_budget_gives_same_tokens(llama_dir, reference):
    tokens, llm = run(llama_dir, max_num_batched_tokens=7, max_num_seqs=4)
    assert tokens == reference
    llm.shutdown()


def test_prompt_alone_equals_prompt_in_batch(llama_dir, reference):
    llm = LLM(model=llama_dir, max_model_len=256, enable_prefix_caching=False)
    for prompt, expected in zip(PROMPTS, reference):
        assert llm.generate(prompt, GREEDY, use_tqdm=False)[0].outputs[0].token_ids == expected
    llm.shutdown()


def test_block_size_32_gives_same_tokens(llama_dir, reference):
    tokens, llm = run(llama_dir, block_size=32)
    assert tokens == reference
    llm.shutdown()


def test_n_greater_than_one_shares_prompt_blocks(llama_dir):
    llm = LLM(model=llama_dir, max_model_len=256)
    params = SamplingParams(n=4, temperature=1.0, seed=1, max_tokens=8, ignore_eos=True)
    out = llm.generate(SHARED, params, use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    # The three later children found the first child's full prompt blocks in the cache.
    assert metric(llm, "prefix_cache_hits") >= 3 * (len(out.prompt_token_ids) // 16) * 16
    assert_all_blocks_free(llm)
    llm.shutdown()
