"""Tool parsers on outputs recorded from the models each format belongs to: whole outputs give the
recorded calls, and the same outputs streamed (token by token and in random chunks) reassemble into
exactly the non-streaming answer, in OpenAI's chunk shape."""

from __future__ import annotations

import json
import logging
import string

import pytest
from parser_streams import STREAM_MODES, build_tokenizer, stream_steps

from pagedllm.entrypoints.openai.protocol import ChatCompletionRequest, DeltaFunctionCall, DeltaMessage, DeltaToolCall
from pagedllm.entrypoints.openai.tool_parsers import ToolParserManager
from pagedllm.entrypoints.openai.tool_parsers.utils import partial_json_loads, stable_arguments_prefix

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]

NESTED_ARGS = {"title": "Réunion \"Q3\" à 東京 🙂", "attendees": [{"name": "Zoë", "email": "zoe@example.com"}],
               "options": {"reminder_minutes": 15, "all_day": False, "ratio": 0.75, "budget": 1500.0,
                           "note": None, "agenda": "1. intro\n2. \\ path C:\\tmp"}}


def _j(obj) -> str:
    return json.dumps(obj, ensure_ascii=False)


# (parser, id, model output, expected content, expected [(name, arguments)]; None = tools not called)
CASES = [
    # Qwen2.5-7B-Instruct
    ("hermes", "plain", "The capital of France is Paris.", "The capital of France is Paris.", None),
    ("hermes", "one_call",
     '<tool_call>\n{"name": "get_weather", "arguments": {"location": "San Francisco, CA, USA", "unit": "celsius"}}\n'
     "</tool_call>",
     None, [("get_weather", {"location": "San Francisco, CA, USA", "unit": "celsius"})]),
    ("hermes", "parallel",
     '<tool_call>\n{"name": "get_current_temperature", "arguments": {"location": "San Francisco, CA, USA"}}\n</tool_call>\n'
     '<tool_call>\n{"name": "get_temperature_date", "arguments": {"location": "San Francisco, CA, USA", '
     '"date": "2024-10-01", "unit": "celsius"}}\n</tool_call>',
     None, [("get_current_temperature", {"location": "San Francisco, CA, USA"}),
            ("get_temperature_date", {"location": "San Francisco, CA, USA", "date": "2024-10-01", "unit": "celsius"})]),
    ("hermes", "content_before_and_after",
     "I'll look up the weather in both cities for you.\n"
     '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n\n'
     '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Berlin"}}\n</tool_call>\nDone.',
     "I'll look up the weather in both cities for you.\n",
     [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Berlin"})]),
    ("hermes", "nested_unicode_escapes",
     f'<tool_call>\n{{"name": "create_event", "arguments": {json.dumps(NESTED_ARGS)}}}\n</tool_call>',
     None, [("create_event", NESTED_ARGS)]),
    ("hermes", "no_arguments_no_closing_tag", '<tool_call>\n{"name": "get_time"}\n', None, [("get_time", {})]),
    ("hermes", "not_json", 'Checking.<tool_call>\nget_weather(city="Paris")\n</tool_call>',
     'Checking.<tool_call>\nget_weather(city="Paris")\n</tool_call>', None),
    # Llama-3.1-8B-Instruct
    ("llama3_json", "plain", "I don't have a tool for that, but Paris is usually mild in May.",
     "I don't have a tool for that, but Paris is usually mild in May.", None),
    ("llama3_json", "one_call",
     '{"name": "get_current_conditions", "parameters": {"location": "San Francisco, CA", "unit": "Fahrenheit"}}',
     None, [("get_current_conditions", {"location": "San Francisco, CA", "unit": "Fahrenheit"})]),
    ("llama3_json", "python_tag_parallel",
     '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
     '{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}',
     None, [("get_weather", {"city": "Paris"}), ("get_time", {"timezone": "Europe/Paris"})]),
    ("llama3_json", "nested_unicode_escapes", f'{{"name": "create_event", "parameters": {json.dumps(NESTED_ARGS)}}}',
     None, [("create_event", NESTED_ARGS)]),
    ("llama3_json", "json_that_is_not_a_call", '{"answer": 42, "unit": "km"}', '{"answer": 42, "unit": "km"}', None),
    ("llama3_json", "builtin_python", '<|python_tag|>brave_search.call(query="weather in Paris")',
     '<|python_tag|>brave_search.call(query="weather in Paris")', None),
    # Mistral-7B-Instruct-v0.3 (v3 tokenizer) and the [ARGS] format of v11+ tokenizers
    ("mistral", "plain", "Paris is the capital of France.", "Paris is the capital of France.", None),
    ("mistral", "one_call",
     '[TOOL_CALLS] [{"name": "get_current_weather", "arguments": {"location": "Paris, France", "format": "celsius"}}]',
     None, [("get_current_weather", {"location": "Paris, France", "format": "celsius"})]),
    ("mistral", "parallel",
     '[TOOL_CALLS] [{"name": "get_current_weather", "arguments": {"location": "Paris, France", "format": "celsius"}}, '
     '{"name": "get_current_weather", "arguments": {"location": "Berlin, Germany", "format": "celsius"}}]',
     None, [("get_current_weather", {"location": "Paris, France", "format": "celsius"}),
            ("get_current_weather", {"location": "Berlin, Germany", "format": "celsius"})]),
    ("mistral", "nested_unicode_escapes", f'[TOOL_CALLS] [{{"name": "create_event", "arguments": {json.dumps(NESTED_ARGS)}}}]',
     None, [("create_event", NESTED_ARGS)]),
    ("mistral", "v11_content_then_parallel",
     'Let me check both.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "days": 3}'
     '[TOOL_CALLS]get_weather[ARGS]{"city": "東京", "days": 1.5e1}',
     "Let me check both.", [("get_weather", {"city": "Paris", "days": 3}), ("get_weather", {"city": "東京", "days": 15.0})]),
]

# Outputs whose call is broken or cut off: non-streaming gives them back as content. A stream cannot
# take back what it sent before the JSON went wrong; it must not raise, nor send content beyond the text.
NEVER_PARSE = [
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}\n</tool_call>'),
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}]'),
    ("hermes", '<tool_call>{bad'),
    ("hermes", 'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris"'),
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": '),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Pa'),
]

TOKENIZER = build_tokenizer([c[2] for c in CASES] + [u[1] for u in NEVER_PARSE])


def _request(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=[{"role": "user", "content": "What's the weather?"}], tools=TOOLS, **kw)


def _parser(name: str):
    return ToolParserManager.get(name)(TOKENIZER)


def _check_id(parser_name: str, tool_call_id: str) -> None:
    if parser_name == "mistral":
        assert len(tool_call_id) == 9 and all(c in string.ascii_letters + string.digits for c in tool_call_id)
    else:
        assert tool_call_id.startswith("chatcmpl-tool-")


@pytest.mark.parametrize("parser_name,case,output,content,calls", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_extract_tool_calls_gives_the_recorded_calls(parser_name, case, output, content, calls):
    info = _parser(parser_name).extract_tool_calls(output, _request())
    assert info.content == content
    if calls is None:
        assert not info.tools_called and info.tool_calls == []
        return
    assert info.tools_called
    assert [(c.function.name, json.loads(c.function.arguments)) for c in info.tool_calls] == calls
    for tool_call, (_, arguments) in zip(info.tool_calls, calls):
        assert tool_call.type == "function" and tool_call.function.arguments == _j(arguments)
        _check_id(parser_name, tool_call.id)
    assert len({c.id for c in info.tool_calls}) == len(info.tool_calls)


def _reassemble(parser_name: str, output: str, seed) -> tuple[str, list[dict]]:
    """Feed a fresh parser the stream of `output`; check each chunk's shape; return the content and
    the calls as a client would rebuild them."""
    parser, request = _parser(parser_name), _request()
    content, calls = "", []
    for step in stream_steps(TOKENIZER, output, seed):
        delta = parser.extract_tool_calls_streaming(*step.args(), request=request)
        if delta is None:
            continue
        assert isinstance(delta, DeltaMessage) and (delta.content or delta.tool_calls)
        content += delta.content or ""
        for tc in delta.tool_calls:
            if tc.index == len(calls):  # a call's first chunk: id, type and the whole name
                assert tc.id and tc.type == "function" and tc.function.name
                calls.append({"id": tc.id, "name": tc.function.name, "arguments": tc.function.arguments or ""})
            else:  # later chunks: only the index and a piece of the arguments
                assert tc.index < len(calls) and tc.id is None and tc.type is None
                assert tc.function.name is None and tc.function.arguments
                calls[tc.index]["arguments"] += tc.function.arguments
    return content, calls


@pytest.mark.parametrize("seed", STREAM_MODES, ids=lambda s: "tokens" if s is None else f"chunks{s}")
@pytest.mark.parametrize("parser_name,case,output,content,calls", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_streaming_reassembles_to_the_non_streaming_result(parser_name, case, output, content, calls, seed, caplog):
    expected = _parser(parser_name).extract_tool_calls(output, _request())
    with caplog.at_level(logging.WARNING, logger="pagedllm"):
        streamed_content, streamed_calls = _reassemble(parser_name, output, seed)
    assert streamed_content == (expected.content or "")
    assert [(c["name"], c["arguments"]) for c in streamed_calls] == \
        [(c.function.name, c.function.arguments) for c in expected.tool_calls]
    assert [json.loads(c["arguments"]) for c in streamed_calls] == [args for _, args in calls or []]
    for call in streamed_calls:
        _check_id(parser_name, call["id"])
    assert len({c["id"] for c in streamed_calls}) == len(streamed_calls)
    assert not [r for r in caplog.records if "changed after being streamed" in r.getMessage()]


@pytest.mark.parametrize("parser_name,output", NEVER_PARSE)
def test_broken_calls_are_content_and_streaming_them_does_not_raise(parser_name, output):
    info = _parser(parser_name).extract_tool_calls(output, _request())
    assert not info.tools_called and info.tool_calls == [] and info.content == output
    for seed in STREAM_MODES:
        content, calls = _reassemble(parser_name, output, seed)
        assert output.startswith(content)
        assert all(c["name"] == "get_weather" for c in calls)


def test_streaming_survives_garbage_without_raising():
    for name in ToolParserManager.names():
        parser = _parser(name)
        text = ""
        for piece in ["<tool_call>", "{", '"name"', ": ", "[TOOL_CALLS]", "]]", "{{", "\\u12", "<|python_tag|>", "}"]:
            previous, text = text, text + piece
            parser.extract_tool_calls_streaming(previous, text, piece, [], [], [], _request())


@pytest.mark.parametrize("arguments", [
    NESTED_ARGS,
    {"n": [1.5e3, -2, 0.125, 12345678901234567890, 1e-7], "t": True, "f": False, "z": None, "e": {}, "l": []},
    {"emoji_escaped": "\U0001F600", "quote": "\"", "backslash": "\\", "nul": "\u0000"},
])
def test_stable_prefix_of_every_partial_text_begins_the_final_arguments(arguments):
    for text in (json.dumps(arguments), json.dumps(arguments, ensure_ascii=False), json.dumps(arguments, indent=1)):
        final = _j(json.loads(text))
        for end in range(1, len(text)):
            try:
                partial = partial_json_loads(text[:end])
            except Exception:
                continue
            prefix = stable_arguments_prefix(partial)
            assert final.startswith(prefix), (text[:end], prefix)


@pytest.mark.parametrize("name", ["hermes", "mistral"])
def test_adjust_request_keeps_special_token_markers_when_tools_are_given(name):
    parser = _parser(name)
    request = _request()
    adjusted = parser.adjust_request(request)
    assert adjusted.skip_special_tokens is False and request.skip_special_tokens is True
    assert parser.adjust_request(_request(tool_choice="none")).skip_special_tokens is True
    no_tools = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}])
    assert parser.adjust_request(no_tools).skip_special_tokens is True


def test_registry_names_and_unknown_name():
    assert {"hermes", "llama3_json", "mistral"} <= set(ToolParserManager.names())
    with pytest.raises(ValueError, match="hermes.*llama3_json.*mistral"):
        ToolParserManager.get("no_such_parser")


def test_chunks_serialize_in_openai_shape():
    first = DeltaMessage(tool_calls=[DeltaToolCall(index=0, id="chatcmpl-tool-1", type="function",
                                                   function=DeltaFunctionCall(name="get_weather", arguments=""))])
    later = DeltaMessage(tool_calls=[DeltaToolCall(index=0, function=DeltaFunctionCall(arguments='{"city": '))])
    assert json.loads(first.model_dump_json(exclude_none=True)) == {"tool_calls": [
        {"index": 0, "id": "chatcmpl-tool-1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]}
    assert later.model_dump(mode="json") == {"role": None, "content": None,
                                             "tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}
    # A delta without tools keeps the shape it had before tool calls existed.
    assert DeltaMessage(role="assistant", content="").model_dump() == {"role": "assistant", "content": ""}
