"""KV-cache sizing on GPU: the arithmetic by hand, and the profiling pass's dummy step on CPU.

The measurements themselves (`torch.cuda.max_memory_allocated` around the dummy step) need a
GPU and run in `benchmarks/gpu_check.py`; everything they feed into is checked here.
"""

from __future__ import annotations

import torch

from pagedllm.config import CacheConfig, SchedulerConfig
from pagedllm.sampling_params import SamplingParams
from pagedllm.worker.kv_cache import bytes_per_block, determine_num_blocks
from pagedllm.worker.memory_profiler import (
    MemoryProfile,
    dummy_batch_lengths,
    dummy_kv_caches,
    dummy_requests,
    dummy_step,
    kv_cache_budget,
    needs_memory_profile,
)

GiB = 1 << 30
CUDA = torch.device("cuda")  # only its type is read: no GPU needed


def test_kv_cache_budget_subtracts_everything_but_the_cache():
    profile = MemoryProfile(total_bytes=80 * GiB, weights_bytes=GiB + GiB // 4, peak_activation_bytes=2 * GiB,
                            non_torch_bytes=GiB // 2, cuda_graph_bytes=GiB // 4)
    # 0.9 * 80 = 72 GiB allowed; 72 - 1.25 - 2 - 0.5 - 0.25 = 68 GiB
    assert kv_cache_budget(profile, 0.9) == 68 * GiB
    assert kv_cache_budget(profile, 0.04) < 0  # 3.2 GiB allowed: less than weights and activations


def model_config(llama_dir: str, **overrides):
    from pagedllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model=llama_dir, device="cpu", **overrides)
    return args.create_engine_config(llama_dir, args.load_hf_config(llama_dir))


def test_gpu_block_count_from_the_profile(llama_dir):
    config = model_config(llama_dir, max_model_len=256, max_num_seqs=1000)
    mc, sc = config.model_config, config.scheduler_config
    per_block = bytes_per_block(mc, 16)
    assert per_block == 2 * 2 * 16 * 2 * 16 * 4  # K and V, 2 layers, 16 slots, 2 KV heads, head_dim 16, fp32
    profile = MemoryProfile(total_bytes=GiB, weights_bytes=10 << 20, peak_activation_bytes=20 << 20,
                            non_torch_bytes=5 << 20, cuda_graph_bytes=1 << 20)
    budget = int(GiB * 0.1) - (36 << 20)  # 102.4 - 36 = 66.4 MiB
    blocks = determine_num_blocks(mc, CacheConfig(gpu_memory_utilization=0.1), sc, CUDA, profile=profile)
    assert blocks == budget // per_block - 1 == 8498  # one block of the budget is the padding block
    # The explicit settings win, and never need a profile.
    assert determine_num_blocks(mc, CacheConfig(num_gpu_blocks_override=7), sc, CUDA) == 7
    assert determine_num_blocks(mc, CacheConfig(kv_cache_memory_bytes=per_block * 11), sc, CUDA) == 10
    assert not needs_memory_profile(CUDA, CacheConfig(num_gpu_blocks_override=7))
    assert not needs_memory_profile(CUDA, CacheConfig(kv_cache_memory_bytes=1 << 20))
    assert needs_memory_profile(CUDA, CacheConfig())
    assert not needs_memory_profile(torch.device("cpu"), CacheConfig())


def test_gpu_block_count_is_capped_at_what_requests_can_use(llama_dir):
    config = model_config(llama_dir, max_model_len=256, max_num_seqs=2)
    profile = MemoryProfile(total_bytes=80 * GiB, weights_bytes=0, peak_activation_bytes=0, non_torch_bytes=0)
    blocks = determine_num_blocks(config.model_config, CacheConfig(), config.scheduler_config, CUDA, profile=profile)
    assert blocks == 2 * 256 // 16


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
        kv_caches = dummy_kv_caches(runner, requests)
        dummy_step(runner, requests, kv_caches, sample=True)
        assert kv_caches[0][0].abs().sum() > 0  # the dummy K/V went into the throw-away cache
    llm.shutdown()
