"""Tensor parallelism on CPU (gloo): two worker processes give what one process gives.

Every check compares `tensor_parallel_size=2` with `tensor_parallel_size=1` on the same tiny
checkpoint and the same engine settings, so any difference comes from the split itself: greedy
tokens must be identical and logprobs equal within float32 rounding (the all-reduce sums partial
products in another order).
"""

from __future__ import annotations

import math
import os
import signal
import time
from types import SimpleNamespace

import pytest
import torch

from conftest import assert_preempted_hit_and_freed

from pagedllm import LLM, SamplingParams
from pagedllm.config import ParallelConfig
from pagedllm.executor import ExecutorDeadError

SHARED = "Continuous batching lets new requests join while others are still decoding. " * 3
PROMPTS = [SHARED + tail for tail in ("The capital", "Hello, my name", "Prefix caching")] + [
    "The capital of France is Paris.",
    "a",
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=2)
# 12 blocks of 16 tokens cannot hold the five requests at once: the engine must preempt.
SMALL_CACHE = dict(max_model_len=192, num_gpu_blocks_override=12)


def generate_twice(llm: LLM) -> list:
    """Two rounds: the second finds the shared prefixes in the cache."""
    params = [GREEDY] * (len(PROMPTS) - 1) + [SamplingParams(temperature=0.0, max_tokens=4, prompt_logprobs=2)]
    return [llm.generate(PROMPTS, params, use_tqdm=False) for _ in range(2)]


def assert_same(expected: list, got: list) -> None:
    for expected_round, got_round in zip(expected, got):
        for e, g in zip(expected_round, got_round):
            e, g = e.outputs[0], g.outputs[0]
            assert g.token_ids == e.token_ids
            for token, lp_e, lp_g in zip(e.token_ids, e.logprobs or [], g.logprobs or []):
                assert set(lp_g) == set(lp_e)
                assert math.isclose(lp_g[token].logprob, lp_e[token].logprob, abs_tol=1e-4)
        for e, g in zip(expected_round, got_round):
            if e.prompt_logprobs is not None:
                for pos, (pe, pg) in enumerate(zip(e.prompt_logprobs[1:], g.prompt_logprobs[1:])):
                    for token in pe:
                        assert math.isclose(pg[token].logprob, pe[token].logprob, abs_tol=1e-4), pos


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_tp2_gives_the_same_greedy_tokens_as_tp1_with_preemption_and_prefix_caching(family, request):
    model_dir = request.getfixturevalue(f"{family}_dir")
    results = {}
    for tp in (1, 2):
        llm = LLM(model=model_dir, tensor_parallel_size=tp, **SMALL_CACHE)
        try:
            results[tp] = generate_twice(llm)
            executor = type(llm.llm_engine.engine_core.core.model_executor).__name__
            assert executor == {1: "UniProcExecutor", 2: "MultiprocExecutor"}[tp]
            assert_preempted_hit_and_freed(llm)
        finally:
            llm.shutdown()
    assert_same(results[1], results[2])


def test_kv_cache_of_a_worker_holds_its_share_of_the_heads(llm):
    from pagedllm.core.kv_cache_utils import bytes_per_block

    mc = llm.llm_engine.config.model_config
    assert bytes_per_block(mc, 16, tp_size=2) * 2 == bytes_per_block(mc, 16)


def test_two_tp_engines_on_one_host_and_a_dead_worker_fails_loudly(llama_dir):
    """Ports are picked per engine, so two run side by side; killing a worker of one fails its
    next step at once with a clear error, and leaves the other engine running."""
    prompts = ["The capital of France is", "Hello, my name is"]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    first = LLM(model=llama_dir, max_model_len=128, tensor_parallel_size=2)
    second = LLM(model=llama_dir, max_model_len=128, tensor_parallel_size=2)
    try:
        a = [o.outputs[0].token_ids for o in first.generate(prompts, params, use_tqdm=False)]
        b = [o.outputs[0].token_ids for o in second.generate(prompts, params, use_tqdm=False)]
        assert a == b
        victim = first.llm_engine.engine_core.core.model_executor.processes[1]
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(10)
        start = time.monotonic()
        with pytest.raises(ExecutorDeadError, match="tensor-parallel worker 1 .*died"):
            first.generate(prompts, params, use_tqdm=False)
        assert time.monotonic() - start < 10
        assert not first.llm_engine.has_unfinished_requests()
        with pytest.raises(ExecutorDeadError, match="dead"):  # and stays dead, fast
            first.generate(prompts, params, use_tqdm=False)
        assert not any(p.is_alive() for p in first.llm_engine.engine_core.core.model_executor.processes)
        assert [o.outputs[0].token_ids for o in second.generate(prompts, params, use_tqdm=False)] == a
    finally:
        first.shutdown()
        second.shutdown()


def config_like(heads: int = 4, kv_heads: int = 2, intermediate: int = 128) -> SimpleNamespace:
    return SimpleNamespace(num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=intermediate)


@pytest.mark.parametrize(("tp", "field"), [(3, "num_attention_heads"), (4, "num_key_value_heads")])
def test_tp_that_does_not_divide_the_heads_is_refused(llama_dir, tp, field):
    with pytest.raises(ValueError, match=f"tensor_parallel_size \\({tp}\\) must divide the model's {field}"):
        LLM(model=llama_dir, max_model_len=128, tensor_parallel_size=tp)


def test_parallel_config_validation(monkeypatch):
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        ParallelConfig(tensor_parallel_size=0)
    with pytest.raises(ValueError, match="data_parallel_size"):
        ParallelConfig(data_parallel_size=0)
    with pytest.raises(ValueError, match="distributed_executor_backend"):
        ParallelConfig(distributed_executor_backend="mpi")
    with pytest.raises(ValueError, match="'uni'"):
        ParallelConfig(tensor_parallel_size=2, distributed_executor_backend="uni")
    assert ParallelConfig().executor_backend == "uni"
    assert ParallelConfig(tensor_parallel_size=2).executor_backend == "mp"
    with pytest.raises(ValueError, match="intermediate_size"):
        ParallelConfig(tensor_parallel_size=2).verify_with_model(config_like(intermediate=129), torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="larger than the number of CUDA devices"):
        ParallelConfig(tensor_parallel_size=2).verify_with_model(config_like(), torch.device("cuda"))
    ParallelConfig(tensor_parallel_size=2).verify_with_model(config_like(), torch.device("cpu"))


def test_offline_data_parallel_is_refused_with_a_pointer_to_serve(llama_dir):
    with pytest.raises(ValueError, match="data-parallel-size"):
        LLM(model=llama_dir, data_parallel_size=2)


def test_tp2_on_ray_workers_matches_tp1_and_a_dead_actor_fails_loudly(qwen2_dir, monkeypatch):
    ray = pytest.importorskip("ray")
    from pagedllm.executor.ray_utils import shutdown_ray

    monkeypatch.setenv("RAY_ADDRESS", "local")  # a fresh one-machine cluster, whatever else runs here
    prompts = ["The capital of France is", "Hello, my name is"]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    reference = LLM(model=qwen2_dir, max_model_len=128)
    expected = [o.outputs[0].token_ids for o in reference.generate(prompts, params, use_tqdm=False)]
    reference.shutdown()
    llm = LLM(model=qwen2_dir, max_model_len=128, tensor_parallel_size=2, distributed_executor_backend="ray")
    try:
        executor = llm.llm_engine.engine_core.core.model_executor
        assert type(executor).__name__ == "RayDistributedExecutor" and len(executor.workers) == 2
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == expected
        ray.kill(executor.workers[1])
        with pytest.raises(ExecutorDeadError, match="Ray worker 1 died"):
            llm.generate(prompts, params, use_tqdm=False)
    finally:
        llm.shutdown()
        shutdown_ray()


def test_a_dead_executor_ends_the_engine_loop_at_once(llm, monkeypatch):
    """In the server, a dead worker is not one bad request: the loop stops and says why."""
    from pagedllm.engine.core_loop import EngineCoreLoop
    from pagedllm.engine.core_messages import AddRequests, EngineDeadError

    core = llm.llm_engine.engine_core.core

    def dead_step():
        raise ExecutorDeadError("tensor-parallel worker 1 died")

    monkeypatch.setattr(core, "step", dead_step)
    request = llm.llm_engine.input_processor.process("dead-executor", "Hello", SamplingParams(max_tokens=2))
    try:
        with pytest.raises(EngineDeadError, match="worker 1 died"):
            EngineCoreLoop(core).run_iteration([AddRequests(request.core_requests)])
    finally:
        core.abort_requests(request.child_ids)
