"""The server fuzzed from its own OpenAPI schema (schemathesis), and `SamplingParams` by property (hypothesis).

Schemathesis reads `/openapi.json` from a real `pagedllm serve` on 127.0.0.1 and sends every operation
bodies it generates from the schema, valid and not; no answer may be a 5xx and none may hang. Afterwards
the server still answers a normal request and every KV block is free. This is the short run of the
suite (a few dozen examples per operation); `benchmarks/server_fuzz.py` runs the same checks longer.

The properties: every `SamplingParams` the constructor accepts runs through a real engine step without
error, and every one it rejects is a `ValueError` (or `NotImplementedError`) naming the field.
"""

from __future__ import annotations

import math

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from pagedllm import SamplingParams  # noqa: E402
from test_server_harness import RemoteServer  # noqa: E402

EXAMPLES = 25  # per operation: the suite's short run

# Each fuzzed request is answered within this many seconds, or it counts as a hang.
CALL_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def fuzz_server(llama_dir):
    # Small limits, so that what the fuzzer may ask for stays quick on the tiny model.
    server = RemoteServer(llama_dir, "--max-model-len", "128", "--max-sequences-per-request", "8",
                          "--max-prompts-per-request", "8", "--max-num-seqs", "16")
    yield server
    server.stop()


def fuzz_every_operation(server: RemoteServer, examples: int) -> dict[str, int]:
    """Schemathesis's cases for each operation of the server's own schema, sent to it (hypothesis drives
    the generation); fails on the first 5xx or timeout. Returns how many cases each operation got."""
    api = schemathesis.openapi.from_url(server.url("/openapi.json"), headers=server.headers)
    counts: dict[str, int] = {}
    operations = [result.ok() for result in api.get_all_operations()]
    for operation, mode in ((op, mode) for op in operations for mode in schemathesis.GenerationMode):
        counts.setdefault(operation.label, 0)

        @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy(mode))  # bodies the schema allows, then ones it does not
        def send(case) -> None:
            counts[operation.label] += 1
            response = case.call(headers=server.headers, timeout=CALL_TIMEOUT_S)
            assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:500])

        try:
            send()
        except Unsatisfiable:  # no request breaks the schema of an operation that takes no input
            assert mode is schemathesis.GenerationMode.NEGATIVE
    return counts


def test_no_generated_request_gets_a_5xx_or_hangs(fuzz_server):
    counts = fuzz_every_operation(fuzz_server, EXAMPLES)
    assert {"POST /v1/completions", "POST /v1/chat/completions", "POST /tokenize"} <= set(counts)
    assert all(n > 0 for n in counts.values()), counts


def test_after_the_fuzzing_the_server_serves_and_holds_no_block(fuzz_server):
    r = fuzz_server.post("/v1/completions", {"prompt": "The capital of France is", "max_tokens": 4})
    assert r.status_code == 200, r.text
    metrics = fuzz_server.wait_idle(timeout=60)
    assert metrics["pagedllm:kv_cache_usage_perc"] == 0 and metrics["pagedllm:engine_healthy"] == 1
    assert httpx.get(fuzz_server.url("/health"), timeout=10).status_code == 200


# ----- SamplingParams, by property ------------------------------------------------------------------
_INTS = st.one_of(st.integers(-3, 300), st.integers(min_value=-(2**70), max_value=2**70), st.booleans())
_FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(-3, 3))
FIELDS = {
    "n": _INTS, "temperature": _FLOATS, "top_p": _FLOATS, "top_k": _INTS, "min_p": _FLOATS,
    "presence_penalty": _FLOATS, "frequency_penalty": _FLOATS, "repetition_penalty": _FLOATS,
    "seed": st.one_of(st.none(), _INTS), "max_tokens": st.one_of(st.none(), _INTS), "min_tokens": _INTS,
    "logprobs": st.one_of(st.none(), _INTS), "prompt_logprobs": st.one_of(st.none(), _INTS),
    "stop": st.one_of(st.none(), st.text(max_size=4), st.lists(st.text(max_size=4), max_size=3)),
    "stop_token_ids": st.one_of(st.none(), st.lists(_INTS, max_size=3)),
    "allowed_token_ids": st.one_of(st.none(), st.lists(_INTS, max_size=3)),
    "logit_bias": st.one_of(st.none(), st.dictionaries(_INTS, _FLOATS, max_size=3)),
    "ignore_eos": st.booleans(),
}


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.fixed_dictionaries({}, optional=FIELDS))
def test_sampling_params_are_accepted_and_run_or_refused_by_name(llm, fields):
    fields = {k: v for k, v in fields.items()}
    if "max_tokens" in fields and isinstance(fields["max_tokens"], int) and not isinstance(fields["max_tokens"], bool):
        fields["max_tokens"] = min(fields["max_tokens"], 3)  # keep accepted runs short
    if isinstance(fields.get("n"), int) and not isinstance(fields["n"], bool):
        fields["n"] = min(fields["n"], 3)
    try:
        params = SamplingParams(**fields)
    except (ValueError, NotImplementedError) as e:
        assert any(name in str(e) for name in fields), (fields, str(e))
        return
    try:
        out = llm.generate({"prompt_token_ids": [5, 6, 7]}, params, use_tqdm=False)
    except ValueError as e:  # the engine's own checks (vocabulary, max_logprobs), also by name
        assert any(name in str(e) for name in fields), (fields, str(e))
        return
    finally:
        assert not llm.llm_engine.has_unfinished_requests()
    assert out[0].finished and len(out[0].outputs) == params.n
    for completion in out[0].outputs:
        assert completion.finish_reason in ("stop", "length")
        if completion.cumulative_logprob is not None:
            assert not math.isnan(completion.cumulative_logprob)
