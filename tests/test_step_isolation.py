"""A step that raises: the engine core finds the request that breaks it, fails that one alone, and
keeps everyone else's answers exact; a broken engine is still declared dead.

Faults are injected into the real engine (the tiny Llama) by wrapping its executor's `execute_model`;
the engine loop (`EngineCoreLoop`) is driven one iteration at a time, as the server drives it.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.engine.core_loop import EngineCoreLoop
from pagedllm.engine.core_messages import AddRequests, EngineDeadError

PROMPTS = ["The capital of France is", "Hello, my name is", "Prefix caching shares blocks", "a b c"]
PARAMS = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture
def engine_llm(llama_dir):
    """A fresh engine per test: what one test's faults teach the engine core must not carry over."""
    llm = LLM(model=llama_dir, max_model_len=128)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def expected(llm):
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)]


@contextmanager
def faults(llm: LLM, fault):
    """While inside, every step first calls `fault(scheduler_output)`, which may raise."""
    executor = llm.llm_engine.engine_core.core.model_executor
    original = executor.execute_model

    def faulty(scheduler_output):
        fault(scheduler_output)
        return original(scheduler_output)

    executor.execute_model = faulty
    try:
        yield
    finally:
        executor.execute_model = original


def breaks_steps(llm: LLM, prompt: str):
    """A fault: every step holding a request for `prompt` raises (recognised by its token ids)."""
    bad_ids = llm.llm_engine.input_processor.process("x", prompt, PARAMS).core_requests[0].prompt_token_ids

    def fault(sched):
        if any(s.prompt_token_ids == bad_ids for s in sched.scheduled):
            raise RuntimeError("injected: this prompt breaks steps")

    return fault


def run_loop(llm: LLM, fault, max_iterations: int = 400, prompts: list[str] = PROMPTS):
    """Add every prompt, run the loop with `fault(scheduler_output)` able to raise, collect each
    request's tokens and errors; raises EngineDeadError if the loop declares the engine dead."""
    core = llm.llm_engine.engine_core.core
    loop = EngineCoreLoop(core)
    tokens: dict[str, list[int]] = {}
    errors: dict[str, str] = {}
    try:
        with faults(llm, fault):
            commands = []
            for i, prompt in enumerate(prompts):
                request = llm.llm_engine.input_processor.process(f"r{i}", prompt, PARAMS)
                commands.append(AddRequests(request.core_requests))
                tokens[f"r{i}"] = []
            for _ in range(max_iterations):
                result, _ = loop.run_iteration(commands)
                commands = []
                for out in result.outputs:
                    tokens[out.request_id] += out.new_token_ids
                for error in result.errors:
                    errors[error.request_id] = error.message
                if not core.has_unfinished_requests():
                    break
    finally:
        core.abort_requests(core.unfinished_request_ids())
    assert core.kv_cache_manager.usage() == 0  # every block free or cached again
    return tokens, errors


def test_a_request_whose_decode_breaks_steps_fails_alone_and_the_rest_are_exact(engine_llm, expected):
    """r1 breaks every step in which it decodes (not its prefill): the rerun of a failed step is the
    same decode, so r1 is found, and the others' tokens are what they are without any fault."""
    def fault(sched):
        if any(s.request_id == "r1" and len(s.token_ids) == 1 and s.num_computed_tokens > 8 for s in sched.scheduled):
            raise RuntimeError("injected: r1's decode")

    tokens, errors = run_loop(engine_llm, fault)
    assert set(errors) == {"r1"} and "injected" in errors["r1"]
    for i in (0, 2, 3):
        assert tokens[f"r{i}"] == expected[i]


def test_a_batch_that_always_fails_though_each_request_passes_alone_is_a_dead_engine(engine_llm):
    def fault(sched):
        if len(sched.scheduled) > 1:
            raise RuntimeError("injected: batches of more than one")

    with pytest.raises(EngineDeadError, match="the engine is broken"):
        run_loop(engine_llm, fault)


def test_bad_requests_one_after_another_each_fail_alone_and_the_engine_lives(engine_llm, expected):
    """Five requests that break every step they are in, each arriving on an idle engine: no step
    succeeds between them, yet each is failed alone (a step of made-up input still passes), and the
    engine then answers exactly."""
    fault = breaks_steps(engine_llm, PROMPTS[1])
    for _ in range(5):
        tokens, errors = run_loop(engine_llm, fault, prompts=[PROMPTS[1]])
        assert set(errors) == {"r0"} and "injected" in errors["r0"]
    tokens, errors = run_loop(engine_llm, fault, prompts=[PROMPTS[0]])
    assert not errors and tokens["r0"] == expected[0]


def test_a_request_failing_alone_where_made_up_input_fails_too_is_a_dead_engine(engine_llm):
    """Every step fails: the first request found failing alone is followed by a step of made-up
    input, which fails too, so the engine is declared dead rather than each request failed in turn."""
    def fault(sched):
        if sched.scheduled:
            raise RuntimeError("injected: the engine is broken")

    with pytest.raises(EngineDeadError, match="the engine is broken"):
        run_loop(engine_llm, fault)


def test_llm_engine_users_who_catch_step_errors_and_step_on_get_the_others_exact(engine_llm, expected):
    """Offline, a failed step is raised; the request found to break steps is aborted before its error
    is raised, so a caller that catches and steps on is left with the others, whose answers are exact."""
    from pagedllm.engine.engine_core import StepFailedError

    engine = engine_llm.llm_engine
    fault = breaks_steps(engine_llm, PROMPTS[1])
    with faults(engine_llm, fault):
        for i, prompt in enumerate(PROMPTS):
            engine.add_request(f"q{i}", prompt, PARAMS)
        finished, culprits = {}, []
        for _ in range(200):
            if not engine.has_unfinished_requests():
                break
            try:
                outputs = engine.step()
            except StepFailedError as e:
                culprits.append(e.culprit)
                continue
            finished.update({o.request_id: o.outputs[0].token_ids for o in outputs if o.finished})
    assert culprits[-1] == "q1" and not engine.has_unfinished_requests()
    assert finished == {f"q{i}": expected[i] for i in (0, 2, 3)}
    assert engine.engine_core.core.kv_cache_manager.usage() == 0
