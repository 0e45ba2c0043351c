"""KV-cache sizing: the arithmetic by hand, and the profiling pass's dummy step on CPU.

The measurements themselves (`torch.cuda.max_memory_allocated` around the dummy step) need a
GPU and run in `benchmarks/gpu_check.py`; everything they feed into is checked here.
"""

from __future__ import annotations

import torch

import dataclasses

from pagedllm.config import CacheConfig
from pagedllm.core.kv_cache_utils import bytes_per_block, num_blocks_for_budget
from pagedllm.sampling_params import SamplingParams
from pagedllm.worker.memory_profiler import MemoryProfile, dummy_batch_lengths, dummy_requests, kv_cache_budget

GiB = 1 << 30


def test_kv_cache_budget_subtracts_everything_but_the_cache():
    profile = MemoryProfile(total_bytes=80 * GiB, weights_bytes=GiB + GiB // 4, peak_activation_bytes=2 * GiB,
                            non_torch_bytes=GiB // 2, cuda_graph_bytes=GiB // 4)
    # 0.9 * 80 = 72 GiB allowed; 72 - 1.25 - 2 - 0.5 - 0.25 = 68 GiB
    assert kv_cache_budget(profile, 0.9) == 68 * GiB
    assert kv_cache_budget(profile, 0.04) < 0  # 3.2 GiB allowed: less than weights and activations


def engine_config(llama_dir: str, cache_config: CacheConfig = CacheConfig(), **overrides):
    from pagedllm.engine.arg_utils import EngineArgs

    config = EngineArgs(model=llama_dir, device="cpu", **overrides).create_engine_config()
    return dataclasses.replace(config, cache_config=cache_config)


def test_gpu_block_count_from_the_profile(llama_dir):
    config = engine_config(llama_dir, max_model_len=256, max_num_seqs=1000)
    per_block = bytes_per_block(config.model_config, 16)
    assert per_block == 2 * 2 * 16 * 2 * 16 * 4  # K and V, 2 layers, 16 slots, 2 KV heads, head_dim 16, fp32
    profile = MemoryProfile(total_bytes=GiB, weights_bytes=10 << 20, peak_activation_bytes=20 << 20,
                            non_torch_bytes=5 << 20, cuda_graph_bytes=1 << 20)
    budget = kv_cache_budget(profile, 0.1)
    assert budget == int(GiB * 0.1) - (36 << 20)  # 102.4 - 36 = 66.4 MiB
    assert num_blocks_for_budget(config, budget) == budget // per_block - 1 == 8498  # one is the padding block
    # An explicit block count wins over any budget.
    assert num_blocks_for_budget(engine_config(llama_dir, CacheConfig(num_gpu_blocks_override=7)), budget) == 7
    assert num_blocks_for_budget(config, per_block * 11) == 10


def test_block_count_is_capped_at_what_requests_can_use(llama_dir):
    config = engine_config(llama_dir, max_model_len=256, max_num_seqs=2)
    assert num_blocks_for_budget(config, 80 * GiB) == 2 * 256 // 16


def test_a_configured_budget_needs_no_profile(llama_dir):
    """On CPU (and on GPU when kv_cache_memory_bytes is given) a worker reports the configured budget
    without running the profile, which needs CUDA."""
    from pagedllm import LLM

    llm = LLM(model=llama_dir, max_model_len=64, kv_cache_memory_bytes=3 << 20)
    try:
        executor = llm.llm_engine.engine_core.core.model_executor
        assert executor.determine_available_memory() == 3 << 20
        per_block = bytes_per_block(llm.llm_engine.config.model_config, 16)
        assert llm.llm_engine.engine_core.core.kv_cache_manager.num_blocks == (3 << 20) // per_block - 1
    finally:
        llm.shutdown()


def test_dummy_batch_fills_the_token_budget():
    assert dummy_batch_lengths(8192, 256, 2048) == [32] * 256
    assert dummy_batch_lengths(10, 3, 100) == [4, 3, 3]
    assert dummy_batch_lengths(100, 256, 2048) == [1] * 100  # fewer tokens than sequences
    assert dummy_batch_lengths(8192, 2, 1024) == [1024, 1024]  # no prompt beyond max_model_len


def test_dummy_step_runs_prefill_and_worst_case_sampler(llama_dir):
    from pagedllm import LLM

    llm = LLM(model=llama_dir, max_model_len=64, dtype="float32")
    runner = llm.llm_engine.model_runner
    worst = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, logprobs=20)
    for lengths in ([20, 19, 1], [1] * 4):
        requests = dummy_requests(lengths, runner.block_size, worst)
        assert [len(r.block_ids) for r in requests] == [-(-n // runner.block_size) for n in lengths]
        kv_caches = runner.allocate_dummy_kv_caches(max(max(r.block_ids) for r in requests) + 1)
        runner.dummy_step(requests, kv_caches, sample=True)
        assert kv_caches[0][0].abs().sum() > 0  # the dummy K/V went into the throw-away cache
    llm.shutdown()
