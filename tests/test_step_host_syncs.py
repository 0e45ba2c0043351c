"""A step reads back from the device only what it returns: the sampled tokens (and logprobs).

On a GPU every read of a device value (`.item()`, `.tolist()`, `bool(t)`, ...) waits for the
queue to drain; one per step is the floor, since the scheduler needs the tokens. On CPU those
calls cost nothing, so this counts them instead: every read-back method of `torch.Tensor`
is wrapped while the model runner executes a step. (`benchmarks/gpu_check.py` checks the same
on a GPU with `torch.cuda.set_sync_debug_mode`, which also sees the copies.)
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

READBACKS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


@pytest.fixture
def readbacks(monkeypatch) -> Counter:
    counts: Counter = Counter()
    for name in READBACKS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            counts[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counts


def run_steps(llm, params_list, readbacks: Counter) -> list[Counter]:
    """Add one request per params, run the engine to completion; read-backs per runner step."""
    engine = llm.llm_engine
    for i, params in enumerate(params_list):
        engine.add_request(str(i), "Hello, my name is " + "x " * (5 * i), params)
    runner = engine.model_runner
    execute = runner.execute_model
    per_step: list[Counter] = []

    def counting_execute(sched):
        readbacks.clear()
        out = execute(sched)
        per_step.append(Counter(readbacks))
        return out

    runner.execute_model = counting_execute
    try:
        while engine.has_unfinished_requests():
            engine.step()
    finally:
        runner.execute_model = execute
    return per_step


@pytest.fixture(scope="module")
def torch_llm(llama_dir):
    from pagedllm import LLM

    engine = LLM(model=llama_dir, max_model_len=128, max_num_batched_tokens=16, dtype="float32")
    yield engine
    engine.shutdown()


def test_greedy_and_sampled_steps_read_back_only_the_tokens(torch_llm, readbacks):
    from pagedllm import SamplingParams

    # Greedy, plain sampling, top-k/top-p/min-p, penalties, a seed, a logit bias, allowed tokens,
    # min_tokens: every sampler path at once, in prefill, chunked-prefill and decode steps.
    params = [
        SamplingParams(temperature=0.0, max_tokens=6),
        SamplingParams(temperature=0.8, max_tokens=5),
        SamplingParams(temperature=0.7, top_k=5, top_p=0.9, min_p=0.05, max_tokens=7),
        SamplingParams(temperature=1.0, presence_penalty=0.5, frequency_penalty=0.2, repetition_penalty=1.2,
                       seed=3, max_tokens=4),
        SamplingParams(temperature=1.0, logit_bias={5: 2.0}, allowed_token_ids=[5, 6, 7], min_tokens=2,
                       max_tokens=3),
    ]
    steps = run_steps(torch_llm, params, readbacks)
    assert len(steps) > 5
    for counts in steps:
        assert counts in (Counter(), Counter(tolist=1)), counts  # a step that samples nothing reads nothing


def test_logprobs_add_one_read_back_per_result_tensor(torch_llm, readbacks):
    from pagedllm import SamplingParams

    steps = run_steps(torch_llm, [SamplingParams(temperature=0.0, max_tokens=4, logprobs=2)] * 2, readbacks)
    sampling_steps = [c for c in steps if c]
    assert sampling_steps and all(c == Counter(tolist=4) for c in sampling_steps), steps  # tokens, ids, values, ranks
