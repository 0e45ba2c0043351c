"""`pagedllm serve` driven as its users drive it: the official `openai` client and raw HTTP.

Every test runs against a real server process on 127.0.0.1: with the tiny random-weight Llama (the
engine core in its own process, the default, then in a thread), then (marked `real_model`) with
the SmolLM2 default model. Greedy answers are checked
against the offline `LLM` on the same model, so the server is shown to add nothing and lose nothing.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.parse
from dataclasses import dataclass

import httpx
import openai
import pytest

from pagedllm import LLM, SamplingParams
from test_server_harness import RemoteServer, sse_events

PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@dataclass
class Case:
    server: RemoteServer
    model: str
    offline: LLM
    max_model_len: int
    exact_batches: bool  # greedy results are identical whatever the batch (true of the tiny model)

    @property
    def client(self) -> openai.OpenAI:
        return self.server.client()

    def greedy(self, prompt, max_tokens: int = 16, **params):
        return self.offline.generate(prompt, SamplingParams(temperature=0, max_tokens=max_tokens, **params),
                                     use_tqdm=False)


@pytest.fixture(scope="module",
                params=["tiny", "tiny-engine-thread", pytest.param("smollm2", marks=pytest.mark.real_model)])
def case(request):
    if request.param.startswith("tiny"):
        core = "thread" if request.param.endswith("thread") else "process"
        server = RemoteServer(request.getfixturevalue("llama_dir"), "--max-model-len", "512",
                              "--served-model-name", "tiny", "tiny-alias", "--engine-core", core)
        offline, model, max_model_len, exact = request.getfixturevalue("llm"), "tiny", 512, True
    else:
        server = RemoteServer(None, "--max-model-len", "1024")
        offline, model, max_model_len, exact = LLM(max_model_len=1024), "SmolLM2-135M-Instruct", 1024, False
    try:
        yield Case(server, model, offline, max_model_len, exact)
    finally:
        code = server.stop()
        if request.param == "smollm2":
            offline.shutdown()
        assert code in (0, -15), server.read_log()


# ----- the basics -----------------------------------------------------------------------------
def test_models_health_and_version(case):
    assert httpx.get(case.server.url("/health")).status_code == 200
    assert httpx.get(case.server.url("/version")).json()["version"]
    ids = [m.id for m in case.client.models.list().data]
    assert ids[0] == case.model
    if case.model == "tiny":
        assert ids == ["tiny", "tiny-alias"]
        alias = case.client.completions.create(model="tiny-alias", prompt=PROMPT, max_tokens=2, temperature=0)
        assert alias.model == "tiny"


def test_completion_equals_offline_greedy(case):
    expected = case.greedy(PROMPT)[0]
    out = case.client.completions.create(model=case.model, prompt=PROMPT, max_tokens=16, temperature=0)
    assert out.object == "text_completion" and out.id.startswith("cmpl-")
    assert out.choices[0].text == expected.outputs[0].text
    assert out.choices[0].finish_reason == expected.outputs[0].finish_reason
    assert out.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert out.usage.completion_tokens == len(expected.outputs[0].token_ids)
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_streamed_completion_concatenates_to_the_full_text(case):
    full = case.client.completions.create(model=case.model, prompt=PROMPT, max_tokens=24, temperature=0)
    chunks = list(case.client.completions.create(model=case.model, prompt=PROMPT, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == full.choices[0].text
    assert text_chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage
    assert all(c.usage is None for c in text_chunks)


def test_chat_streams_role_first_usage_then_done_last(case):
    full = case.client.chat.completions.create(model=case.model, messages=MESSAGES, max_tokens=24, temperature=0)
    assert full.object == "chat.completion" and full.choices[0].message.role == "assistant"
    body = {"model": case.model, "messages": MESSAGES, "max_tokens": 24, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", case.server.url("/v1/chat/completions"), json=body, headers=case.server.headers,
                      timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    first, usage, content = events[0], events[-2], events[1:-2]
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert usage["choices"] == [] and usage["usage"] == full.usage.model_dump(exclude_none=True)
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in content) == full.choices[0].message.content
    assert content[-1]["choices"][0]["finish_reason"] == full.choices[0].finish_reason
    assert len({e["id"] for e in events[:-1]}) == 1


def test_chat_equals_offline_chat(case):
    expected = case.offline.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0]
    out = case.client.chat.completions.create(model=case.model, messages=MESSAGES, max_tokens=24, temperature=0)
    assert out.choices[0].message.content == expected.outputs[0].text
    assert out.usage.prompt_tokens == len(expected.prompt_token_ids)


# ----- request fields ---------------------------------------------------------------------------
def test_n_completions_are_all_returned_and_counted(case):
    out = case.client.completions.create(model=case.model, prompt=PROMPT, n=3, max_tokens=8, temperature=1.0,
                                         seed=5, logprobs=0)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert out.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in out.choices)
    chunks = list(case.client.chat.completions.create(model=case.model, messages=MESSAGES, n=2, max_tokens=8,
                                                      temperature=1.0, seed=5, stream=True))
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices[0].index == index]
        assert mine[0].delta.role == "assistant" and mine[-1].finish_reason is not None


def test_n_streams_end_each_choice_once_even_when_they_finish_apart(case):
    stop = [" ", "e", "a", "."] if case.exact_batches else ["."]  # a real model's first token starts with " "
    params = dict(n=4, temperature=1.0, seed=3, stop=stop, max_tokens=40)
    prompt = "My favourite food is"
    full = case.client.completions.create(model=case.model, prompt=prompt, **params)
    assert len({c.text for c in full.choices}) > 1  # they really do finish apart
    chunks = list(case.client.completions.create(model=case.model, prompt=prompt, stream=True, **params))
    for choice in full.choices:
        mine = [c.choices[0] for c in chunks if c.choices[0].index == choice.index]
        assert [c.finish_reason for c in mine].count(None) == len(mine) - 1 and mine[-1].finish_reason
        assert "".join(c.text for c in mine) == choice.text
    chat = list(case.client.chat.completions.create(model=case.model, messages=MESSAGES, stream=True, **params))
    for index in range(4):
        mine = [c.choices[0] for c in chat if c.choices[0].index == index]
        assert [c.finish_reason is not None for c in mine].count(True) == 1 and mine[-1].finish_reason


def test_batch_of_prompts_and_token_id_prompts(case):
    prompts = [PROMPT, "Hello, my name is"]
    out = case.client.completions.create(model=case.model, prompt=prompts, n=2, max_tokens=8, temperature=0)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    expected = case.greedy(prompts, max_tokens=8)
    for i, exp in enumerate(expected):
        assert out.choices[2 * i].text == out.choices[2 * i + 1].text == exp.outputs[0].text
    assert out.usage.prompt_tokens == sum(len(e.prompt_token_ids) for e in expected)
    chunks = list(case.client.completions.create(model=case.model, prompt=prompts, n=2, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    streamed = ["".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == k) for k in range(4)]
    assert streamed == [c.text for c in out.choices] and chunks[-1].usage == out.usage
    ids = case.server.post("/tokenize", {"model": case.model, "prompt": PROMPT}).json()["tokens"]
    by_ids = case.client.completions.create(model=case.model, prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == expected[0].outputs[0].text
    both = case.client.completions.create(model=case.model, prompt=[ids, ids], max_tokens=8, temperature=0)
    assert [c.text for c in both.choices] == [expected[0].outputs[0].text] * 2


def test_stop_strings_and_stop_token_ids_match_the_offline_engine(case):
    full = case.greedy(PROMPT, max_tokens=24)[0].outputs[0]
    stop = full.text[len(full.text) // 2:][:2]
    for extra in ({"stop": [stop]}, {"stop": [stop], "include_stop_str_in_output": True},
                  {"stop_token_ids": [full.token_ids[3]]}):
        expected = case.greedy(PROMPT, max_tokens=24, **extra)[0].outputs[0]
        out = case.client.completions.create(model=case.model, prompt=PROMPT, max_tokens=24, temperature=0,
                                             extra_body={k: v for k, v in extra.items() if k != "stop"},
                                             stop=extra.get("stop"))
        choice = out.choices[0]
        assert choice.text == expected.text, extra
        assert choice.finish_reason == "stop" and choice.model_extra["stop_reason"] == expected.stop_reason


def test_logprobs_match_the_offline_engine(case):
    expected = case.greedy(PROMPT, max_tokens=8, logprobs=3)[0].outputs[0]
    out = case.client.completions.create(model=case.model, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(expected.token_ids)
    for i, token_id in enumerate(expected.token_ids):
        assert lp.token_logprobs[i] == pytest.approx(expected.logprobs[i][token_id].logprob, abs=1e-4)
        assert 1 <= len(lp.top_logprobs[i]) <= 4
        assert max(lp.top_logprobs[i].values()) == pytest.approx(lp.token_logprobs[i], abs=1e-6)  # greedy
    assert lp.text_offset == sorted(lp.text_offset)

    chat = case.client.chat.completions.create(model=case.model, messages=MESSAGES, max_tokens=8, temperature=0,
                                               logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.logprob <= 0
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-6)
        assert entry.bytes == list(entry.token.encode())
    no_lp = case.client.chat.completions.create(model=case.model, messages=MESSAGES, max_tokens=2, temperature=0)
    assert no_lp.choices[0].logprobs is None


def test_echo_returns_the_prompt_and_its_logprobs(case):
    out = case.client.completions.create(model=case.model, prompt=PROMPT, max_tokens=4, temperature=0, echo=True,
                                         logprobs=1)
    choice = out.choices[0]
    assert choice.text.startswith(PROMPT)
    assert len(choice.logprobs.tokens) == out.usage.prompt_tokens + out.usage.completion_tokens
    assert sum(lp is None for lp in choice.logprobs.token_logprobs) <= 1  # only the first token has none
    score = case.client.completions.create(model=case.model, prompt=PROMPT, max_tokens=0, echo=True, logprobs=0)
    assert score.choices[0].text == PROMPT and score.usage.completion_tokens == 0
    assert len(score.choices[0].logprobs.tokens) == score.usage.prompt_tokens


def test_seed_makes_sampling_reproducible(case):
    def sample(seed: int) -> str:
        return case.client.completions.create(model=case.model, prompt=PROMPT, max_tokens=12, temperature=1.0,
                                              seed=seed).choices[0].text

    first = sample(123)
    assert sample(123) == first
    assert any(sample(seed) != first for seed in (1, 2, 3, 4))


def test_usage_counts_prompt_tokens_as_tokenize_does(case):
    count = case.server.post("/tokenize", {"model": case.model, "prompt": PROMPT}).json()["count"]
    out = case.client.completions.create(model=case.model, prompt=PROMPT, max_tokens=3, temperature=0)
    assert out.usage.prompt_tokens == count
    chat_count = case.server.post("/tokenize", {"model": case.model, "messages": MESSAGES}).json()["count"]
    chat = case.client.chat.completions.create(model=case.model, messages=MESSAGES, max_tokens=3, temperature=0)
    assert chat.usage.prompt_tokens == chat_count


def test_tokenize_and_detokenize_round_trip(case):
    tok = case.server.post("/tokenize", {"model": case.model, "prompt": PROMPT, "add_special_tokens": False,
                                         "return_token_strs": True}).json()
    assert tok["count"] == len(tok["tokens"]) == len(tok["token_strs"]) and tok["max_model_len"] == case.max_model_len
    detok = case.server.post("/detokenize", {"model": case.model, "tokens": tok["tokens"]}).json()
    assert detok["prompt"] == PROMPT


# ----- bad input ----------------------------------------------------------------------------------
_LONG = "Paris " * 2000
_BAD_REQUESTS = [
    # (path, body, status, param, code)
    ("/v1/completions", {"prompt": PROMPT, "temperature": -1}, 400, "temperature", None),
    ("/v1/completions", {"prompt": PROMPT, "temperature": "hot"}, 400, "temperature", None),
    ("/v1/completions", {"prompt": PROMPT, "top_p": 1.5}, 400, "top_p", None),
    ("/v1/completions", {"prompt": PROMPT, "top_k": -5}, 400, "top_k", None),
    ("/v1/completions", {"prompt": PROMPT, "repetition_penalty": 0}, 400, "repetition_penalty", None),
    ("/v1/completions", {"prompt": PROMPT, "n": 0}, 400, "n", None),
    ("/v1/completions", {"prompt": PROMPT, "n": 100000}, 400, "n", None),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 0}, 400, "max_tokens", None),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 5, "min_tokens": 9}, 400, "min_tokens", None),
    ("/v1/completions", {"prompt": PROMPT, "logprobs": 21}, 400, "logprobs", None),
    ("/v1/completions", {"prompt": PROMPT, "prompt_logprobs": -1}, 400, "prompt_logprobs", None),
    ("/v1/completions", {"prompt": PROMPT, "stop": 5}, 400, "stop", None),
    ("/v1/completions", {"prompt": PROMPT, "stop": [""]}, 400, "stop", None),
    ("/v1/completions", {"prompt": PROMPT, "seed": 2**70}, 400, "seed", None),
    ("/v1/completions", {"prompt": PROMPT, "logit_bias": {"abc": 1}}, 400, "logit_bias", None),
    ("/v1/completions", {"prompt": PROMPT, "logit_bias": {"99999999": 1}}, 400, "logit_bias", None),
    ("/v1/completions", {"prompt": PROMPT, "stream_options": "yes"}, 400, "stream_options", None),
    ("/v1/completions", {"prompt": PROMPT, "suffix": "x"}, 400, "suffix", None),
    ("/v1/completions", {"prompt": PROMPT, "stream": True, "temperature": -1}, 400, "temperature", None),
    ("/v1/completions", {"temperature": 0}, 400, "prompt", None),
    ("/v1/completions", {"prompt": []}, 400, "prompt", None),
    ("/v1/completions", {"prompt": [1, "a"]}, 400, "prompt", None),
    ("/v1/completions", {"prompt": [99999999]}, 400, "prompt", None),
    ("/v1/completions", {"prompt": [-1, 2]}, 400, "prompt", None),
    ("/v1/completions", {"prompt": _LONG}, 400, "prompt", "context_length_exceeded"),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 100000}, 400, "max_tokens", "context_length_exceeded"),
    ("/v1/completions", {"prompt": PROMPT, "model": "no-such-model"}, 404, "model", "model_not_found"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", None),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages", None),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400, "messages.0.role", None),
    ("/v1/chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "messages.0.content", None),
    ("/v1/chat/completions", {"messages": MESSAGES, "top_logprobs": 2}, 400, "top_logprobs", None),
    ("/v1/chat/completions", {"messages": MESSAGES, "logprobs": True, "top_logprobs": 50}, 400, "top_logprobs", None),
    ("/v1/chat/completions", {"messages": MESSAGES, "response_format": {"type": "json_schema"}}, 400,
     "response_format", None),
    ("/v1/chat/completions", {"messages": MESSAGES, "continue_final_message": True, "add_generation_prompt": False},
     400, "continue_final_message", None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": _LONG}]}, 400, "messages",
     "context_length_exceeded"),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_completion_tokens": 100000}, 400, "max_completion_tokens",
     "context_length_exceeded"),
    ("/v1/chat/completions", {"messages": MESSAGES, "model": "no-such-model", "stream": True}, 404, "model",
     "model_not_found"),
    # vLLM fields for features pagedllm does not have yet: never silently ignored
    ("/v1/completions", {"prompt": PROMPT, "guided_regex": "[a-z]+"}, 400, "guided_regex", None),
    ("/v1/completions", {"prompt": PROMPT, "structured_outputs": {"choice": []}}, 400, "structured_outputs",
     None),
    ("/v1/chat/completions", {"messages": MESSAGES, "priority": 5}, 400, "priority", None),
    ("/v1/chat/completions", {"messages": MESSAGES, "guided_json": {"type": "object"}}, 400, "guided_json", None),
    ("/v1/completions", {"prompt": PROMPT, "use_beam_search": True}, 400, "use_beam_search", None),
    # values no tensor holds, and vLLM's validation rules (issue #24)
    ("/v1/completions", {"prompt": PROMPT, "top_k": 1180591620717411303424}, 400, "top_k", None),
    ("/v1/completions", {"prompt": PROMPT, "stop_token_ids": [2**64]}, 400, "stop_token_ids", None),
    ("/v1/completions", {"prompt": PROMPT, "stop_token_ids": [99999999]}, 400, "stop_token_ids", None),
    ("/v1/completions", {"prompt": PROMPT, "temperature": 2.5}, 400, "temperature", None),
    ("/v1/completions", {"prompt": PROMPT, "stream_options": {"include_usage": True}}, 400, "stream_options", None),
    ("/v1/completions", b'{"prompt": "Hi \\ud800"}', 400, "prompt", None),
    ("/v1/chat/completions", b'{"messages": [{"role": "user\\udfff", "content": "hi"}]}', 400, "messages.0.role", None),
    ("/tokenize", b'{"prompt": "\\ud83d"}', 400, "prompt", None),
    # bounded work per request
    ("/v1/completions", {"prompt": PROMPT, "stop": [f"s{i}" for i in range(17)]}, 400, "stop", None),
    ("/v1/completions", {"prompt": PROMPT, "stop": ["x" * 1025]}, 400, "stop", None),
    ("/v1/completions", {"prompt": ["a"] * 1025}, 400, "prompt", None),
    ("/v1/completions", {"prompt": ["a"] * 100, "n": 11}, 400, "n", None),
    ("/v1/chat/completions", {"messages": MESSAGES, "chat_template": "{{ messages[0]['content'] }}"}, 400,
     "chat_template", None),
    ("/v1/chat/completions", {"messages": MESSAGES, "chat_template_kwargs": {"chat_template": "x"}}, 400,
     "chat_template", None),
    ("/tokenize", {"model": None}, 400, "prompt", None),
    ("/detokenize", {"tokens": [99999999]}, 400, "tokens", None),
    ("/v1/completions", b'{"prompt": "x", ', 400, None, None),
    ("/v1/completions", b'{"prompt": "x", "temperature": NaN}', 400, "temperature", None),
    ("/v1/completions", b"[]", 400, None, None),
    ("/v1/completions", b"", 400, None, None),
]


@pytest.mark.parametrize("path, body, status, param, code", _BAD_REQUESTS,
                         ids=[f"{i}-{r[0].rsplit('/', 1)[-1]}-{r[3]}" for i, r in enumerate(_BAD_REQUESTS)])
def test_bad_input_is_an_openai_error_never_a_500(case, path, body, status, param, code):
    if isinstance(body, dict) and path != "/tokenize":
        body = {"model": case.model, **body}
    r = case.server.post(path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error


def test_vllm_fields_at_their_defaults_and_unknown_fields_are_accepted(case):
    """A vLLM field pagedllm lacks is fine at the value that asks for nothing; a field nobody defines
    is ignored with a log line (as vLLM does), and the answer is the plain greedy one."""
    expected = case.greedy(PROMPT, max_tokens=4)[0].outputs[0].text
    body = {"model": case.model, "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "priority": 0,
            "use_beam_search": False, "guided_regex": None, "x_my_client_tag": "abc"}
    r = case.server.post("/v1/completions", body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == expected
    assert "Ignoring unknown request fields: ['x_my_client_tag']" in case.server.read_log()


def test_null_means_not_given_for_optional_fields(case):
    """OpenAI's schema allows null for every optional field: it takes the default (n=1, 16 tokens)."""
    body = {"model": case.model, "prompt": PROMPT, "n": None, "max_tokens": None, "temperature": 0, "stop": None,
            "seed": None, "stream": None, "logprobs": None}
    r = case.server.post("/v1/completions", body)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 1 and r.json()["choices"][0]["text"] == case.greedy(PROMPT)[0].outputs[0].text


def test_seeds_use_all_64_bits(case):
    """torch's CPU generator keeps 32 bits of a seed; seeds that differ only above them must still differ."""
    texts = set()
    for seed in (1, 2**32 + 1, 2**40 + 1):
        r = case.server.post("/v1/completions", {"model": case.model, "prompt": PROMPT, "max_tokens": 12,
                                                 "temperature": 1.0, "seed": seed})
        assert r.status_code == 200, r.text
        texts.add(r.json()["choices"][0]["text"])
    assert len(texts) == 3


def test_unknown_routes_and_methods_answer_in_openai_shape(case):
    missing = httpx.get(case.server.url("/v1/nothing-here"), headers=case.server.headers)
    assert missing.status_code == 404 and missing.json()["error"]["message"]
    wrong_method = httpx.get(case.server.url("/v1/completions"), headers=case.server.headers)
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["message"]


def test_the_openai_client_raises_its_own_error_types(case):
    with pytest.raises(openai.BadRequestError):
        case.client.completions.create(model=case.model, prompt=PROMPT, temperature=-1)
    with pytest.raises(openai.NotFoundError):
        case.client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=case.server.url("/v1"), api_key="wrong", max_retries=0).models.list()


def test_api_key_is_required_except_on_probes(case):
    url = case.server.url
    for path, method in (("/v1/models", "GET"), ("/v1/completions", "POST"), ("/v1/chat/completions", "POST"),
                         ("/tokenize", "POST"), ("/detokenize", "POST")):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic test-key"}):
            r = httpx.request(method, url(path), headers=headers, json={"prompt": PROMPT})
            assert r.status_code == 401, (path, headers)
            assert r.json()["error"]["code"] == "invalid_api_key"
    for path in ("/health", "/metrics", "/version"):
        assert httpx.get(url(path)).status_code == 200


# ----- load, disconnects, health --------------------------------------------------------------------
def test_32_concurrent_streaming_clients_are_all_served(case):
    prompts = [f"Request number {i} says" for i in range(32)]

    async def one(client, prompt: str) -> tuple[str, str]:
        stream = await client.completions.create(model=case.model, prompt=prompt, max_tokens=16, temperature=0,
                                                 stream=True)
        text, finish = "", None
        async for chunk in stream:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        return text, finish

    async def main() -> list:
        async with case.server.async_client() as client:
            return await asyncio.wait_for(asyncio.gather(*(one(client, p) for p in prompts)), timeout=300)

    start = time.monotonic()
    results = asyncio.run(main())
    elapsed = time.monotonic() - start
    assert all(finish in ("stop", "length") for _, finish in results)
    if case.exact_batches:
        expected = case.greedy(prompts, max_tokens=16)
        assert [text for text, _ in results] == [e.outputs[0].text for e in expected]
    metrics = case.server.wait_idle()
    assert metrics["pagedllm:kv_cache_usage_perc"] == 0, f"blocks still in use after {elapsed:.1f} s"


def test_a_disconnecting_streaming_client_frees_its_blocks(case):
    before = case.server.metrics()["pagedllm:generation_tokens_total"]
    max_tokens = case.max_model_len - 64
    body = {"model": case.model, "prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", case.server.url("/v1/completions"), json=body, headers=case.server.headers,
                      timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(6):  # three events and their blank lines, then hang up
            next(lines)
    metrics = case.server.wait_idle()
    assert metrics["pagedllm:num_requests_running"] == 0
    assert metrics["pagedllm:kv_cache_usage_perc"] == 0
    assert metrics["pagedllm:generation_tokens_total"] - before < max_tokens  # aborted, not finished


def test_a_disconnecting_non_streaming_client_frees_its_blocks(case):
    """The client hangs up as soon as the first tokens exist. A timer would race the engine (the tiny
    model finishes n=8 x 448 tokens in about 0.3 s here), so the hang-up follows an observed event and
    the request (n=32) is long enough that it cannot have finished by then."""
    before = case.server.metrics()["pagedllm:generation_tokens_total"]
    n, max_tokens = 32, case.max_model_len - 64
    body = json.dumps({"model": case.model, "prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True,
                       "n": n, "temperature": 1.0}).encode()
    url = urllib.parse.urlsplit(case.server.url("/v1/completions"))
    headers = "".join(f"{k}: {v}\r\n" for k, v in case.server.headers.items())
    head = (f"POST {url.path} HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{headers}\r\n").encode()
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(head + body)
        deadline = time.monotonic() + 30
        while case.server.metrics()["pagedllm:generation_tokens_total"] == before:
            assert time.monotonic() < deadline, "the request never started generating"
            time.sleep(0.005)
    metrics = case.server.wait_idle()
    assert metrics["pagedllm:kv_cache_usage_perc"] == 0
    assert metrics["pagedllm:generation_tokens_total"] - before < n * max_tokens  # aborted, not finished


def test_metrics_use_vllm_names(case):
    case.client.completions.create(model=case.model, prompt=PROMPT, max_tokens=4, temperature=0)
    text = httpx.get(case.server.url("/metrics")).text
    for name in ("pagedllm:num_requests_running", "pagedllm:num_requests_waiting", "pagedllm:kv_cache_usage_perc",
                 "pagedllm:prefix_cache_queries_total", "pagedllm:prefix_cache_hits_total",
                 "pagedllm:num_preemptions_total", "pagedllm:prompt_tokens_total", "pagedllm:generation_tokens_total",
                 "pagedllm:time_to_first_token_seconds_bucket", "pagedllm:inter_token_latency_seconds_bucket",
                 "pagedllm:e2e_request_latency_seconds_bucket", "pagedllm:request_success_total"):
        assert name in text, name
    metrics = case.server.metrics()
    assert metrics["pagedllm:e2e_request_latency_seconds_count"] >= 1
    assert metrics["pagedllm:prefix_cache_hits_total"] > 0  # the same prompt was sent many times


def test_the_server_is_still_healthy_afterwards(case):
    assert httpx.get(case.server.url("/health")).status_code == 200
    metrics = case.server.wait_idle()
    assert metrics["pagedllm:kv_cache_usage_perc"] == 0 and metrics["pagedllm:engine_healthy"] == 1
    out = case.client.completions.create(model=case.model, prompt=PROMPT, max_tokens=4, temperature=0)
    assert out.choices[0].text == case.greedy(PROMPT, max_tokens=4)[0].outputs[0].text
