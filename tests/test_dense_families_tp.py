"""Tensor parallelism for Mistral, Phi-3, Gemma 2 and Gemma 3: two workers (gloo, on CPU) give transformers'
tokens and logprobs, as one process does (`test_dense_families.py`), under the same chunking, preemption
and prefix-cache hits. Gemma 3 (local and global KV-cache groups) runs by default, the others are slow."""

from __future__ import annotations

import pytest
from conftest import metric
from test_dense_families import ENGINE, NUM_BLOCKS, PROMPTS, assert_matches_transformers

from pagedllm import LLM, SamplingParams


@pytest.mark.parametrize("family", [
    "gemma3",
    pytest.param("mistral", marks=pytest.mark.slow),
    pytest.param("phi3", marks=pytest.mark.slow),
    pytest.param("gemma2", marks=pytest.mark.slow),
])
def test_tp2_matches_transformers_with_chunks_preemption_and_prefix_hits(family, dense_checkpoint):
    """Two tensor-parallel workers (each half of the heads, of the MLP and of Phi-3's fused weights) give
    what one process gives, which is transformers' (the test above)."""
    model_dir = dense_checkpoint(family)
    llm = LLM(model=model_dir, tensor_parallel_size=2, num_gpu_blocks_override=NUM_BLOCKS[family], **ENGINE)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=1)
    try:
        assert type(llm.llm_engine.engine_core.core.model_executor).__name__ == "MultiprocExecutor"
        rounds = [llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False) for _ in range(2)]
        assert metric(llm, "num_preemptions") > 0
        assert metric(llm, "prefix_cache_hits") > 0
    finally:
        llm.shutdown()
    for outputs in rounds:
        assert_matches_transformers(model_dir, PROMPTS, outputs)
