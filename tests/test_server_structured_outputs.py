"""Structured outputs and tool calls through `pagedllm serve`, driven by the official `openai` client.

On the default model (SmolLM2, marked `real_model`): the 20 real-world schemas of tests/json_schemas.py
through `response_format`, each output validated with `jsonschema`; `client.chat.completions.parse`
with a Pydantic model; a tool-calling round trip (call, tool message, answer); a named tool streamed.
On the tiny random model: vLLM's `structured_outputs` field on completions and chat (n > 1, streaming),
`--enable-auto-tool-choice --tool-call-parser hermes` on an output forced into Hermes' format, and the
400s of bad constraints and tool choices.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from json_schemas import SCHEMAS
from test_server_harness import RemoteServer

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "get_time", "description": "The local time in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                       "required": ["city"], "additionalProperties": False}}}]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
WEATHER = [{"role": "user", "content": "What is the weather like in Paris today?"}]


# ----- the default model ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol():
    server = RemoteServer(None, "--max-model-len", "2048", "--enable-auto-tool-choice", "--tool-call-parser", "hermes")
    yield server
    assert server.stop() in (0, -15), server.read_log()


@pytest.mark.real_model
def test_twenty_schemas_through_response_format_all_validate(smol):
    client = smol.async_client()

    async def one(name: str, schema: dict) -> tuple[str, str, str]:
        out = await client.chat.completions.create(
            model="SmolLM2-135M-Instruct", temperature=0, max_tokens=400,
            messages=[{"role": "user", "content": f"Write one realistic example of a {name.replace('_', ' ')} as JSON."}],
            response_format={"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}})
        return name, out.choices[0].message.content, out.choices[0].finish_reason

    async def run() -> list[tuple[str, str, str]]:
        return await asyncio.gather(*(one(name, schema) for name, schema in SCHEMAS))

    results = asyncio.run(run())
    failures = []
    for (name, schema), (_, text, finish) in zip(SCHEMAS, results):
        try:
            assert finish == "stop", "cut at max_tokens"
            jsonschema.validate(json.loads(text), schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
        except (AssertionError, ValueError, jsonschema.ValidationError) as e:
            failures.append((name, str(e)[:200], text[-200:]))
    assert not failures, failures


@pytest.mark.real_model
def test_schemas_streamed_with_n_2_validate(smol):
    """A stream of two choices per request: each choice's concatenated content validates."""
    client = smol.client()
    checker = jsonschema.Draft202012Validator.FORMAT_CHECKER
    for name, schema in SCHEMAS[::4]:
        texts, finish = ["", ""], [None, None]
        for chunk in client.chat.completions.create(
                model="SmolLM2-135M-Instruct", n=2, temperature=0, max_tokens=400, stream=True,
                messages=[{"role": "user", "content": f"Write one example of a {name.replace('_', ' ')} as JSON."}],
                response_format={"type": "json_schema", "json_schema": {"name": name, "schema": schema}}):
            for c in chunk.choices:
                texts[c.index] += c.delta.content or ""
                finish[c.index] = c.finish_reason or finish[c.index]
        assert finish == ["stop", "stop"], (name, texts)
        for text in texts:
            jsonschema.validate(json.loads(text), schema, format_checker=checker)


class City(BaseModel):
    name: str = Field(max_length=30)
    country: str = Field(max_length=30)
    population_millions: int = Field(ge=0, le=100)
    continent: Literal["Europe", "Asia", "Africa", "America", "Oceania"]


@pytest.mark.real_model
def test_openai_parse_with_a_pydantic_model(smol):
    out = smol.client().chat.completions.parse(
        model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Describe Paris as JSON."}],
        response_format=City, temperature=0, max_tokens=200)
    city = out.choices[0].message.parsed
    assert isinstance(city, City) and out.choices[0].finish_reason == "stop"


@pytest.mark.real_model
def test_tool_call_round_trip(smol):
    """tool_choice "required": the calls come back as tool_calls (finish_reason "tool_calls"), their
    arguments valid for the tool; the tool's answer goes back as a "tool" message and the model answers."""
    client = smol.client()
    first = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=WEATHER, tools=TOOLS,
                                           tool_choice="required", temperature=0, max_tokens=200)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.id and call.type == "function"
        jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])
    messages = WEATHER + [choice.message.model_dump(exclude_none=True)] + [
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 18, "sky": "sunny"})}
        for call in choice.message.tool_calls]
    answer = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages, tools=TOOLS,
                                            tool_choice="none", temperature=0, max_tokens=60)
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls


@pytest.mark.real_model
def test_named_tool_streams_the_same_call(smol):
    client = smol.client()
    named = {"type": "function", "function": {"name": "get_time"}}
    full = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=WEATHER, tools=TOOLS,
                                          tool_choice=named, temperature=0, max_tokens=100)
    call = full.choices[0].message.tool_calls[0]
    assert call.function.name == "get_time" and full.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(call.function.arguments), PARAMS["get_time"])
    names, arguments, finish = [], "", None
    for chunk in client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=WEATHER, tools=TOOLS,
                                                tool_choice=named, temperature=0, max_tokens=100, stream=True):
        for delta in chunk.choices[0].delta.tool_calls or []:
            names += [delta.function.name] if delta.function.name else []
            arguments += delta.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert names == ["get_time"] and arguments == call.function.arguments and finish == "stop"


# ----- the tiny random model ------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(llama_dir):
    server = RemoteServer(llama_dir, "--max-model-len", "512", "--served-model-name", "tiny",
                          "--enable-auto-tool-choice", "--tool-call-parser", "hermes")
    yield server
    assert server.stop() in (0, -15), server.read_log()


def test_completions_structured_outputs_field_with_n_and_stream(tiny):
    client = tiny.client()
    pattern = r"[a-z]{2,5}-[0-9]{1,3}"
    out = client.completions.create(model="tiny", prompt="The capital of France is", n=3, temperature=1.0, seed=1,
                                    max_tokens=50, extra_body={"structured_outputs": {"regex": pattern}})
    assert all(re.fullmatch(pattern, c.text) for c in out.choices), [c.text for c in out.choices]
    texts = ["", ""]
    for chunk in client.completions.create(model="tiny", prompt="Hello", n=2, temperature=1.0, seed=2, max_tokens=20,
                                           stream=True, extra_body={"structured_outputs": {"choice": ["yes", "no"]}}):
        for c in chunk.choices:
            texts[c.index] += c.text
    assert all(t in ("yes", "no") for t in texts), texts


def test_twenty_schemas_on_the_tiny_model_server(tiny):
    """The corpus through /v1/completions on the random model (compact JSON: see test_structured_outputs.py,
    whose offline run this repeats), half of them streamed."""
    client = tiny.async_client()

    async def one(i: int, schema: dict) -> tuple[str, str]:
        body = dict(model="tiny", prompt="The capital of France is", temperature=0, max_tokens=450,
                    extra_body={"structured_outputs": {"json": schema, "disable_any_whitespace": True}})
        if i % 2:
            text, finish = "", None
            async for chunk in await client.completions.create(**body, stream=True):
                if chunk.choices:
                    text += chunk.choices[0].text
                    finish = chunk.choices[0].finish_reason or finish
            return text, finish
        out = await client.completions.create(**body)
        return out.choices[0].text, out.choices[0].finish_reason

    async def run() -> list[tuple[str, str]]:
        return await asyncio.gather(*(one(i, schema) for i, (_, schema) in enumerate(SCHEMAS)))

    checker = jsonschema.Draft202012Validator.FORMAT_CHECKER
    for (name, schema), (text, finish) in zip(SCHEMAS, asyncio.run(run())):
        assert finish == "stop", (name, text[-200:])
        jsonschema.validate(json.loads(text), schema, format_checker=checker)


def test_chat_json_schema_streamed_equals_whole(tiny):
    schema = {"type": "object", "properties": {"city": {"type": "string", "pattern": "^[a-z]{1,8}$"},
                                               "rank": {"type": "integer", "minimum": 1, "maximum": 9}},
              "required": ["city", "rank"], "additionalProperties": False}
    body = dict(model="tiny", messages=WEATHER, temperature=0, max_tokens=100,
                extra_body={"structured_outputs": {"json": schema, "disable_any_whitespace": True}})
    client = tiny.client()
    whole = client.chat.completions.create(**body).choices[0].message.content
    jsonschema.validate(json.loads(whole), schema)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**body, stream=True)
                       if c.choices)
    assert streamed == whole


def test_auto_tool_choice_parses_hermes_calls(tiny):
    """The output is forced (by a regex) into Hermes' format; the server's hermes parser turns it into
    tool_calls, whole and streamed."""
    forced = r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "Paris", "unit": "celsius"\}\}\n</tool_call>'
    body = dict(model="tiny", messages=WEATHER, tools=TOOLS, temperature=0, max_tokens=120,
                extra_body={"structured_outputs": {"regex": forced}})
    client = tiny.client()
    out = client.chat.completions.create(**body)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == [
        ("get_weather", {"city": "Paris", "unit": "celsius"})]
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(**body, stream=True):
        for delta in chunk.choices[0].delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"name": None, "arguments": ""})
            call["name"] = call["name"] or delta.function.name
            call["arguments"] += delta.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        ("get_weather", {"city": "Paris", "unit": "celsius"})]


@pytest.mark.parametrize("body, param", [
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}),
     "response_format"),
    (dict(response_format={"type": "json_schema"}), "response_format"),
    (dict(response_format={"type": "yaml"}), "response_format"),
    (dict(extra_body={"structured_outputs": {"regex": "[a-z", }}), "structured_outputs"),
    (dict(extra_body={"structured_outputs": {"regex": "a", "choice": ["a"]}}), "structured_outputs"),
    (dict(extra_body={"structured_outputs": {"regexp": "a"}}), "structured_outputs"),
    (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
    (dict(tool_choice="required"), "tool_choice"),
    (dict(tools=TOOLS, tool_choice="required", response_format={"type": "json_object"}), "tool_choice"),
    (dict(tools=[{"type": "function", "function": {"parameters": {}}}]), "tools.0.function.name"),
])
def test_bad_constraints_and_tool_choices_are_400s_naming_the_field(tiny, body, param):
    with pytest.raises(openai.BadRequestError) as info:
        tiny.client().chat.completions.create(model="tiny", messages=WEATHER, max_tokens=5, **body)
    assert info.value.status_code == 400 and info.value.body["param"] == param, info.value.body
    assert tiny.client().chat.completions.create(model="tiny", messages=WEATHER, max_tokens=2).choices


def test_auto_tool_choice_needs_the_flags(llama_dir):
    server = RemoteServer(llama_dir, "--max-model-len", "256", "--served-model-name", "tiny")
    try:
        with pytest.raises(openai.BadRequestError, match="enable-auto-tool-choice"):
            server.client().chat.completions.create(model="tiny", messages=WEATHER, tools=TOOLS, tool_choice="auto",
                                                    max_tokens=2)
    finally:
        server.stop()


def test_reasoning_parser_and_a_constraint_that_starts_after_the_reasoning(tmp_path):
    """`--reasoning-parser deepseek_r1`: the text before `</think>` is reasoning_content, the rest content;
    the constraint applies only after `</think>`. A logit bias makes `</think>` the first token; had the
    constraint applied from the start, `</think>` (which the regex forbids) could never be written and the
    whole output would be reasoning."""
    from conftest import build_checkpoint

    model = build_checkpoint(str(tmp_path), "qwen3", extra_tokens=("<think>", "</think>"), tie_word_embeddings=True)
    server = RemoteServer(model, "--max-model-len", "256", "--served-model-name", "r1", "--reasoning-parser",
                          "deepseek_r1")
    try:
        client = server.client()
        end = server.post("/tokenize", {"model": "r1", "prompt": "</think>", "add_special_tokens": False}).json()["tokens"]
        assert len(end) == 1
        body = dict(model="r1", messages=WEATHER, temperature=0, max_tokens=30, logit_bias={str(end[0]): 100},
                    extra_body={"structured_outputs": {"regex": "(yes|no), [a-z]{3}"}})
        message = client.chat.completions.create(**body).choices[0].message
        assert re.fullmatch("(yes|no), [a-z]{3}", message.content), message
        assert getattr(message, "reasoning_content", None) in (None, "")
        reasoning, content = "", ""
        for chunk in client.chat.completions.create(**body, stream=True):
            if chunk.choices:
                reasoning += getattr(chunk.choices[0].delta, "reasoning_content", None) or ""
                content += chunk.choices[0].delta.content or ""
        assert reasoning == "" and content == message.content
    finally:
        server.stop()
