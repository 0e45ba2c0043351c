"""The engine-state snapshot (`LLMEngine.get_engine_state`, `GET /v1/engine/state`) in known scenarios.

Offline on the tiny Llama, then over HTTP against a real `pagedllm serve`: two requests sharing a
prefix show shared blocks with both owners, a forced preemption (a KV cache too small for the
load) shows up, and once every request has finished each block is free or cached.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.core.snapshot import BLOCK_STATES
from pagedllm.engine.engine_state import EngineState, StateHistory
from test_server_harness import RemoteServer

BLOCK_SIZE = 8
PROMPT_IDS = list(range(10, 40))  # 30 tokens: 3 full blocks of 8, and 6 tokens in a fourth


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)


def check_consistent(state: EngineState) -> None:
    """What must hold in every snapshot: owners are the block tables, counts add up."""
    kv = state.kv_cache
    assert set(kv.block_states()) <= set(BLOCK_STATES)
    tables = {r.request_id: r.block_ids for r in state.running + state.waiting}
    holders: dict[int, list[str]] = {}
    for request_id, block_ids in tables.items():
        for block_id in block_ids:
            holders.setdefault(block_id, []).append(request_id)
    assert {b.block_id: sorted(b.owners) for b in kv.blocks} == {k: sorted(v) for k, v in holders.items()}
    for b in kv.blocks:
        assert b.ref_cnt == len(b.owners) > 0
        assert b.state == ("shared" if b.ref_cnt > 1 else "used")
    assert kv.num_free_blocks == kv.num_blocks - len(kv.blocks)
    assert kv.num_cached_blocks == len(kv.cached_block_ids)
    assert not {b.block_id for b in kv.blocks} & set(kv.cached_block_ids)
    assert all(not r.block_ids for r in state.waiting)  # waiting requests hold nothing
    json.dumps(state.to_dict())  # it is the endpoint's JSON body


def check_idle(state: EngineState) -> None:
    kv = state.kv_cache
    assert not state.running and not state.waiting
    assert kv.blocks == [] and kv.usage == 0
    assert kv.num_free_blocks == kv.num_blocks
    assert set(kv.block_states()) <= {"free", "cached"}


@pytest.fixture(scope="module")
def small_llm(llama_dir):
    engine = LLM(model=llama_dir, max_model_len=96, block_size=BLOCK_SIZE, num_gpu_blocks_override=12)
    yield engine
    engine.shutdown()


@pytest.fixture()
def engine(small_llm):
    """The module's engine, with an empty prefix cache for each test."""
    e = small_llm.llm_engine
    assert not e.has_unfinished_requests()
    assert e.reset_prefix_cache()
    return e


# ----- offline -----------------------------------------------------------------------------------
def test_two_requests_sharing_a_prefix_show_shared_blocks(engine):
    engine.add_request("a", PROMPT_IDS, greedy(4))
    engine.add_request("b", PROMPT_IDS + [50, 51], greedy(4))
    engine.step()
    state = engine.get_engine_state()
    check_consistent(state)
    by_id = {r.request_id: r for r in state.running}
    assert set(by_id) == {"a", "b"}
    a, b = by_id["a"], by_id["b"]
    # b found a's three full prompt blocks in the prefix cache and holds the same physical blocks.
    assert b.num_cached_tokens == 3 * BLOCK_SIZE and a.num_cached_tokens == 0
    assert a.block_ids[:3] == b.block_ids[:3] and a.block_ids[3] != b.block_ids[3]
    blocks = {blk.block_id: blk for blk in state.kv_cache.blocks}
    for block_id in a.block_ids[:3]:
        assert blocks[block_id].state == "shared" and blocks[block_id].ref_cnt == 2
        assert sorted(blocks[block_id].owners) == ["a", "b"] and blocks[block_id].cached
    assert blocks[a.block_ids[3]].state == "used" and blocks[a.block_ids[3]].owners == ["a"]
    assert state.counters.prefix_cache_hits == 3 * BLOCK_SIZE
    while engine.has_unfinished_requests():
        engine.step()
        check_consistent(engine.get_engine_state())
    check_idle(engine.get_engine_state())


def test_n_children_share_their_prompt_blocks_and_name_their_parent(engine):
    engine.add_request("p", PROMPT_IDS, greedy(2, n=2))
    engine.step()
    state = engine.get_engine_state()
    check_consistent(state)
    assert sorted(r.request_id for r in state.running) == ["0_p", "1_p"]
    assert {r.parent_id for r in state.running} == {"p"}
    shared = [b for b in state.kv_cache.blocks if b.state == "shared"]
    assert len(shared) == 3 and all(sorted(b.owners) == ["0_p", "1_p"] for b in shared)
    while engine.has_unfinished_requests():
        engine.step()


def test_forced_preemption_shows_up(engine):
    before = engine.get_engine_state().counters.num_preemptions
    # 12 blocks of 8 tokens cannot hold three requests of 30 + 50 tokens (10 blocks each).
    for name in ("x", "y", "z"):
        engine.add_request(name, [t + ord(name) for t in PROMPT_IDS], greedy(50))
    seen = None
    while engine.has_unfinished_requests():
        engine.step()
        state = engine.get_engine_state()
        check_consistent(state)
        if seen is None and state.counters.num_preemptions > before:
            seen = state
    assert seen is not None, "the workload was meant to force a preemption"
    victim = seen.recent_preemptions[-1]
    preempted = {r.request_id: r for r in seen.waiting if r.status == "preempted"}
    assert victim.request_id in preempted  # back at the front of the waiting queue, holding no block
    assert seen.waiting[0].request_id == victim.request_id
    assert preempted[victim.request_id].num_preemptions >= 1 and not preempted[victim.request_id].block_ids
    assert victim.num_tokens > len(PROMPT_IDS)  # prompt and the tokens it had generated
    final = engine.get_engine_state()
    check_idle(final)
    assert final.counters.num_preemptions == engine.engine_core.core.scheduler.num_preemptions > before


def test_after_all_requests_finish_every_block_is_free_or_cached(engine):
    engine.add_request("one", PROMPT_IDS, greedy(8))
    engine.add_request("two", PROMPT_IDS[::-1], greedy(8))
    while engine.has_unfinished_requests():
        engine.step()
    state = engine.get_engine_state()
    check_idle(state)
    # The full blocks of both prompts and outputs stay findable, in eviction order.
    assert state.kv_cache.num_cached_blocks == len(state.kv_cache.cached_block_ids) >= 6
    assert state.kv_cache.block_states().count("cached") == state.kv_cache.num_cached_blocks
    assert state.counters.requests_finished >= 2 and state.counters.num_steps > 0
    # History is sampled at most once a second: at least one sample, none ahead of the counters.
    assert state.history and state.history[-1].generation_tokens <= state.counters.generation_tokens


def test_history_samples_at_most_once_per_interval_over_a_bounded_span(engine):
    history = StateHistory(interval=10.0, span=30.0)
    history.maybe_record(engine.engine_core.core.stats)
    history.maybe_record(engine.engine_core.core.stats)
    assert len(history.samples) == 1  # the second came within the interval
    for _ in range(5):
        history.maybe_record(engine.engine_core.core.stats, force=True)
    assert len(history.samples) == 3  # 30 s of 10 s samples: the oldest are dropped
    assert [s.time for s in history.samples] == sorted(s.time for s in history.samples)


def test_llm_offers_the_same_snapshot(small_llm):
    small_llm.generate(["Hello, my name is"], greedy(4), use_tqdm=False)
    state = small_llm.get_engine_state()
    check_idle(state)
    assert state.kv_cache.num_blocks == 12 and state.kv_cache.block_size == BLOCK_SIZE
    assert state.max_model_len == 96 and state.counters.generation_tokens >= 4
    assert state.max_num_batched_tokens == 8192  # vLLM's offline default step budget


# ----- over HTTP ---------------------------------------------------------------------------------
# Each model step of the tiny Llama takes about a millisecond: slowed down, a request stays in
# flight long enough for the state to be read while it runs. The patch is made in the server
# process, so a server that uses it runs its engine loop there (`--engine-core thread`).
SLOW_STEPS = """
import time
from pagedllm.worker.model_runner import ModelRunner

_execute_model = ModelRunner.execute_model

def _slow_execute_model(self, scheduler_output):
    time.sleep(0.02)
    return _execute_model(self, scheduler_output)

ModelRunner.execute_model = _slow_execute_model
"""


@pytest.fixture(scope="module")
def server(llama_dir):
    """The engine core in its own process (the default): the state crosses the pipe."""
    # 24 blocks of 16 tokens = 384 tokens: room for one long request, not for four.
    s = RemoteServer(llama_dir, "--max-model-len", "384", "--num-gpu-blocks-override", "24", "--trace")
    try:
        yield s
    finally:
        assert s.stop() in (0, -15), s.read_log()


@pytest.fixture(scope="module")
def slow_server(llama_dir):
    s = RemoteServer(llama_dir, "--max-model-len", "384", "--engine-core", "thread", prelude=SLOW_STEPS)
    try:
        yield s
    finally:
        assert s.stop() in (0, -15), s.read_log()


def get_state(server: RemoteServer) -> dict:
    r = httpx.get(server.url("/v1/engine/state"), headers=server.headers, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def in_background(server: RemoteServer, bodies: list[dict]) -> tuple[threading.Thread, list]:
    results: list = []

    def run() -> None:
        with httpx.Client(timeout=120) as client:
            threads = [threading.Thread(target=lambda b=b: results.append(
                client.post(server.url("/v1/completions"), json=b, headers=server.headers))) for b in bodies]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, results


def wait_for(server: RemoteServer, predicate, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = get_state(server)
        if predicate(state):
            return state
        time.sleep(0.05)
    raise AssertionError(f"the state never matched; last: {json.dumps(state)[:2000]}")


def wait_idle(server: RemoteServer) -> dict:
    return wait_for(server, lambda s: not s["running"] and not s["waiting"])


def test_state_endpoint_shape_and_idle_state(server):
    state = wait_idle(server)
    assert state["model"] and state["max_model_len"] == 384
    # The CPU server's default step budget is half vLLM's (2048): prompt bursts are chunked finer.
    assert state["max_num_batched_tokens"] == 1024
    kv = state["kv_cache"]
    assert kv["num_blocks"] == 24 and kv["block_size"] == 16 and kv["blocks"] == []
    assert set(state["counters"]) >= {"num_preemptions", "prefix_cache_queries", "prefix_cache_hits",
                                      "prompt_tokens", "generation_tokens", "requests_finished", "num_steps"}


def test_server_state_shows_shared_blocks_while_n_2_runs(slow_server):
    server = slow_server
    prompt = "The capital of France is Paris. The capital of Germany is Berlin. " * 3
    thread, results = in_background(server, [{"prompt": prompt, "max_tokens": 60, "n": 2, "ignore_eos": True,
                                               "temperature": 1.0, "seed": 7}])
    state = wait_for(server, lambda s: len(s["running"]) == 2)
    children = sorted(r["request_id"] for r in state["running"])
    assert len({r["parent_id"] for r in state["running"]}) == 1
    shared = [b for b in state["kv_cache"]["blocks"] if b["state"] == "shared"]
    assert shared and all(sorted(b["owners"]) == children and b["ref_cnt"] == 2 for b in shared)
    thread.join()
    assert results[0].status_code == 200, results[0].text
    idle = wait_idle(server)
    assert idle["kv_cache"]["blocks"] == [] and idle["kv_cache"]["num_cached_blocks"] > 0


def test_server_state_shows_a_forced_preemption(server):
    before = wait_idle(server)["counters"]["num_preemptions"]
    bodies = [{"prompt": f"Request {i}: continuous batching lets new requests join.", "max_tokens": 150,
               "ignore_eos": True, "temperature": 0} for i in range(4)]
    thread, results = in_background(server, bodies)
    thread.join()
    assert [r.status_code for r in results] == [200] * 4, [r.text for r in results]
    state = wait_idle(server)
    assert state["counters"]["num_preemptions"] > before
    assert state["recent_preemptions"], state
    victim = state["recent_preemptions"][-1]["request_id"]
    assert victim.startswith("cmpl-")
    assert state["kv_cache"]["blocks"] == []  # every block free or cached again
    # The trace (--trace) followed the victim through its preemption and back.
    log = [line for line in server.read_log().splitlines() if f"req={victim} " in line]
    assert any(" preempted: released [" in line for line in log), log
    assert any(" resumed: " in line for line in log), log
    assert " finished (length): 150 tokens generated" in log[-1], log


def test_state_needs_the_api_key_and_the_page_does_not(server):
    assert httpx.get(server.url("/v1/engine/state"), timeout=10).status_code == 401
    page = httpx.get(server.url("/dashboard"), timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="kv-grid"' in page.text and "/v1/engine/state" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing fetched from elsewhere
    bad = httpx.post(server.url("/v1/engine/state"), headers=server.headers, timeout=10)
    assert bad.status_code == 405 and bad.json()["error"]["message"]


def test_state_without_an_api_key_is_open(llama_dir):
    s = RemoteServer(llama_dir, "--max-model-len", "256", api_key=None)
    try:
        r = httpx.post(s.url("/v1/completions"), json={"prompt": "Hello", "max_tokens": 3}, timeout=60)
        assert r.status_code == 200
        state = httpx.get(s.url("/v1/engine/state"), timeout=30).json()
        assert state["counters"]["requests_finished"] == 1 and state["kv_cache"]["blocks"] == []
    finally:
        assert s.stop() in (0, -15), s.read_log()
