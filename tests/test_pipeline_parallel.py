"""Pipeline parallelism on CPU (gloo): stages in their own processes give what one process gives.

Each check runs the same tiny checkpoint and engine settings with `pipeline_parallel_size=2` (and
with `tensor_parallel_size=2` on top: four workers) and with one process, so any difference comes
from the split: greedy tokens identical, logprobs within float32 rounding. The engine keeps one
batch per stage in flight; preemption, chunked prefill and prefix caching happen along the way.
"""

from __future__ import annotations

import os
import signal
import time
from types import SimpleNamespace

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.config import ParallelConfig, parse_pp_layer_partition
from pagedllm.distributed.parallel_state import get_pp_indices
from pagedllm.executor import ExecutorDeadError
from conftest import assert_preempted_hit_and_freed
from test_tensor_parallel import PROMPTS, SMALL_CACHE, assert_same, generate_twice

# Chunks of 32 tokens: the longer prompts take several steps, some of them alongside decodes.
SETTINGS = dict(SMALL_CACHE, max_num_batched_tokens=32)


def test_layers_split_evenly_with_the_extra_ones_before_the_last_stage():
    # Hand-computed: 7 layers over 3 stages are 2 each and one left over, which goes to the stage
    # just before the last (vLLM's rule: the last stage also runs the norm and the LM head): 2, 3, 2.
    assert [get_pp_indices(7, r, 3) for r in range(3)] == [(0, 2), (2, 5), (5, 7)]
    assert [get_pp_indices(8, r, 3) for r in range(3)] == [(0, 3), (3, 6), (6, 8)]
    assert [get_pp_indices(4, r, 2) for r in range(2)] == [(0, 2), (2, 4)]
    assert get_pp_indices(5, 0, 1) == (0, 5)
    assert [get_pp_indices(8, r, 2, (5, 3)) for r in range(2)] == [(0, 5), (5, 8)]


def test_impossible_layouts_are_refused_before_any_worker_starts(llama_dir, monkeypatch):
    with pytest.raises(ValueError, match="pipeline_parallel_size"):
        ParallelConfig(pipeline_parallel_size=0)
    with pytest.raises(ValueError, match="'uni'"):
        ParallelConfig(pipeline_parallel_size=2, distributed_executor_backend="uni")
    with pytest.raises(ValueError, match="each of the 2 pipeline stages"):
        ParallelConfig(pipeline_parallel_size=2, pp_layer_partition=(2, 0))
    with pytest.raises(ValueError, match="comma-separated"):
        parse_pp_layer_partition("2;1")
    assert ParallelConfig(pipeline_parallel_size=2).executor_backend == "mp"
    assert ParallelConfig(tensor_parallel_size=2, pipeline_parallel_size=2).output_rank == 2
    config = SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)
    with pytest.raises(ValueError, match="larger than the model's 2 layers"):
        ParallelConfig(pipeline_parallel_size=3).verify_with_model(config, torch.device("cpu"))
    with pytest.raises(ValueError, match="runs in one stage"):
        ParallelConfig(pipeline_parallel_size=2).verify_with_model(config, torch.device("cpu"), "pooling")
    # Through the front door, as a user meets them:
    with pytest.raises(ValueError, match="larger than the model's 2 layers"):
        LLM(model=llama_dir, pipeline_parallel_size=3)
    with pytest.raises(ValueError, match="must divide the model's num_key_value_heads"):
        LLM(model=llama_dir, pipeline_parallel_size=2, tensor_parallel_size=4)
    with pytest.raises(ValueError, match="enable_lora"):
        LLM(model=llama_dir, pipeline_parallel_size=2, enable_lora=True)
    monkeypatch.setenv("PAGEDLLM_PP_LAYER_PARTITION", "1,2")
    with pytest.raises(ValueError, match="covers 3 layers; the model has 2"):
        LLM(model=llama_dir, pipeline_parallel_size=2)


def test_sliding_window_models_are_refused_with_stages(dense_checkpoint):
    """Local and global layers keep separate block tables (KV-cache groups), not split by stage yet."""
    with pytest.raises(ValueError, match="sliding-window"):
        LLM(model=dense_checkpoint("gemma3"), pipeline_parallel_size=2)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_pp2_and_tp2_pp2_give_the_tokens_of_one_process(family, request):
    model_dir = request.getfixturevalue(f"{family}_dir")
    results = {}
    for tp, pp in ((1, 1), (1, 2), (2, 2)):
        llm = LLM(model=model_dir, tensor_parallel_size=tp, pipeline_parallel_size=pp, **SETTINGS)
        try:
            results[tp, pp] = generate_twice(llm)
            assert_preempted_hit_and_freed(llm)
            core = llm.llm_engine.engine_core.core
            assert not core.batch_queue
            if pp > 1:
                executor = core.model_executor
                assert type(executor).__name__ == "MultiprocExecutor" and len(executor.processes) == tp * pp
        finally:
            llm.shutdown()
    assert_same(results[1, 1], results[1, 2])
    assert_same(results[1, 1], results[2, 2])


def test_each_stage_holds_only_its_layers_and_an_uneven_split_still_matches(tmp_path, monkeypatch):
    from conftest import build_checkpoint

    model_dir = build_checkpoint(str(tmp_path / "llama3"), "llama", num_hidden_layers=3)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=1)
    one = LLM(model=model_dir, max_model_len=128)
    expected = one.generate(PROMPTS[:3], params, use_tqdm=False)
    whole = one.llm_engine.engine_core.core.model_executor.collective_rpc("weight_bytes")[0]
    one.shutdown()
    monkeypatch.setenv("PAGEDLLM_PP_LAYER_PARTITION", "1,2")
    llm = LLM(model=model_dir, max_model_len=128, pipeline_parallel_size=2)
    try:
        got = llm.generate(PROMPTS[:3], params, use_tqdm=False)
        stage_bytes = llm.llm_engine.engine_core.core.model_executor.collective_rpc("weight_bytes")
    finally:
        llm.shutdown()
    assert_same([expected], [got])
    # Stage 0: embedding + 1 layer; stage 1: 2 layers + norm + LM head. Together the whole model,
    # each well under it.
    assert sum(stage_bytes) == whole
    assert all(b < 0.8 * whole for b in stage_bytes), (stage_bytes, whole)


def test_a_dead_stage_fails_the_engine_within_seconds(llama_dir):
    prompts = ["The capital of France is", "Hello, my name is"]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    llm = LLM(model=llama_dir, max_model_len=128, pipeline_parallel_size=2)
    try:
        llm.generate(prompts, params, use_tqdm=False)
        victim = llm.llm_engine.engine_core.core.model_executor.processes[1]  # the last stage
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(10)
        start = time.monotonic()
        with pytest.raises(ExecutorDeadError, match="worker 1 .*died"):
            llm.generate(prompts, params, use_tqdm=False)
        assert time.monotonic() - start < 10
        assert not any(p.is_alive() for p in llm.llm_engine.engine_core.core.model_executor.processes)
    finally:
        llm.shutdown()


def test_a_pp2_server_answers_as_one_process_does(llama_dir, llm):
    """`pagedllm serve -pp 2` through the openai client: the greedy completions and their logprobs
    are those of the offline engine in one process (the `llm` fixture, same checkpoint)."""
    from test_server_harness import RemoteServer

    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=1)
    expected = llm.generate(PROMPTS, params, use_tqdm=False)
    server = RemoteServer(llama_dir, "--max-model-len", "256", "-pp", "2", "--served-model-name", "tiny")
    try:
        client = server.client()
        for prompt, e in zip(PROMPTS, expected):
            got = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0.0,
                                            logprobs=1, extra_body={"ignore_eos": True})
            choice = got.choices[0]
            assert choice.text == e.outputs[0].text
            for lp_got, token, lp_e in zip(choice.logprobs.token_logprobs, e.outputs[0].token_ids, e.outputs[0].logprobs):
                assert abs(lp_got - lp_e[token].logprob) < 1e-4
    finally:
        code = server.stop()
    assert code in (0, -15), server.read_log()
    assert "pipeline stages" in server.read_log()


@pytest.mark.slow
def test_pp2_on_ray_actors_matches_one_process(llama_dir, monkeypatch):
    pytest.importorskip("ray")
    from pagedllm.executor.ray_utils import shutdown_ray

    monkeypatch.setenv("RAY_ADDRESS", "local")  # a fresh one-machine cluster, whatever else runs here
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=1)
    reference = LLM(model=llama_dir, max_model_len=128)
    expected = reference.generate(PROMPTS, params, use_tqdm=False)
    reference.shutdown()
    llm = LLM(model=llama_dir, max_model_len=128, pipeline_parallel_size=2, distributed_executor_backend="ray")
    try:
        assert type(llm.llm_engine.engine_core.core.model_executor).__name__ == "RayDistributedExecutor"
        got = llm.generate(PROMPTS, params, use_tqdm=False)
    finally:
        llm.shutdown()
        shutdown_ray()
    assert_same([expected], [got])
