"""`mistral`: Mistral's `[TOOL_CALLS]` marker, in both of its tokenizer generations.

    [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, {...}]     (v3, e.g. 7B-Instruct-v0.3)
    [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{}      (v11+, e.g. Small 3.2)

Text before the first `[TOOL_CALLS]` is content; whatever follows the calls is dropped. Mistral's
chat templates refuse tool-call ids that are not 9 alphanumeric characters, so the ids are made so.
"""

from __future__ import annotations

import random
import string
from typing import Any, Optional

from pagedllm.entrypoints.openai.protocol import (ChatCompletionRequest,
                                                  ExtractedToolCallInformation, FunctionCall, ToolCall)
from pagedllm.entrypoints.openai.tool_parsers.abstract_tool_parser import ToolParser, ToolParserManager
from pagedllm.entrypoints.openai.tool_parsers.utils import (ToolCallSnapshot, arguments_json, call_from_json_object,
                                                           decode_json_prefix, partial_json_loads, partial_marker_len,
                                                           snapshot_partial_call_object, stable_arguments_prefix)
from pagedllm.logger import init_logger

logger = init_logger(__name__)

_ALPHANUMERIC = string.ascii_letters + string.digits


@ToolParserManager.register("mistral")
class MistralToolParser(ToolParser):
    bot_token = "[TOOL_CALLS]"
    args_token = "[ARGS]"

    def make_tool_call_id(self) -> str:
        return "".join(random.choices(_ALPHANUMERIC, k=9))

    def adjust_request(self, request: ChatCompletionRequest) -> ChatCompletionRequest:
        # [TOOL_CALLS] and [ARGS] are control tokens: skipping special tokens would erase them.
        if request.tools and request.tool_choice != "none":
            return request.model_copy(update={"skip_special_tokens": False})
        return request

    def _parse_calls(self, calls_text: str) -> tuple[list[ToolCallSnapshot], Optional[bool]]:
        """The calls after the first marker and whether they are finished: True, False (more may come)
        or None (they never will parse, so the output is content)."""
        stripped = calls_text.lstrip()
        if not stripped:
            return [], False
        if stripped[0] in "[{":
            return self._parse_json_calls(stripped)
        calls: list[ToolCallSnapshot] = []
        segments = calls_text.split(self.bot_token)
        for i, segment in enumerate(segments):
            last = i == len(segments) - 1
            if not segment.strip() and not last:
                continue  # a repeated marker
            name, sep, args_text = segment.partition(self.args_token)
            if not sep:  # the newest templates write name{...} without [ARGS]
                brace = segment.find("{")
                if brace == -1:
                    if not last:
                        return calls, None
                    return calls + [ToolCallSnapshot(name=None)], False  # the name is still arriving
                name, args_text = segment[:brace], segment[brace:]
            name = name.strip()
            if not name:
                return calls, None
            args_text = args_text.lstrip()
            decoded = decode_json_prefix(args_text)
            if decoded is not None:
                calls.append(ToolCallSnapshot(name=name, arguments=arguments_json(decoded[0])))
            elif last:
                partial = _partial_value(args_text)
                return calls + [ToolCallSnapshot(name=name, arguments=stable_arguments_prefix(partial))], False
            else:
                return calls, None
        return calls, True

    def _parse_json_calls(self, text: str) -> tuple[list[ToolCallSnapshot], Optional[bool]]:
        """`[{"name": ..., "arguments": ...}, ...]` (or one bare object), finished or not."""
        decoded = decode_json_prefix(text)
        if decoded is not None:
            items = decoded[0] if isinstance(decoded[0], list) else [decoded[0]]
            calls = [call_from_json_object(item) for item in items]
            if not calls or None in calls:
                return [], None
            return [ToolCallSnapshot(*call) for call in calls], True
        items = _partial_value(text)
        items = [items] if isinstance(items, dict) else items
        if not isinstance(items, list):
            return [], False
        # Every item but the last is a finished object; the last may still be arriving.
        calls = []
        for item in items[:-1]:
            call = call_from_json_object(item)
            if call is None:
                return calls, None
            calls.append(ToolCallSnapshot(*call))
        if items:
            start = _last_item_start(text)
            calls.append(snapshot_partial_call_object(text[start:]) if start is not None
                         else ToolCallSnapshot(name=None))
        return calls, False

    def extract_tool_calls(self, model_output: str, request: ChatCompletionRequest) -> ExtractedToolCallInformation:
        start = model_output.find(self.bot_token)
        if start == -1:
            return ExtractedToolCallInformation(tools_called=False, tool_calls=[], content=model_output)
        calls, finished = self._parse_calls(model_output[start + len(self.bot_token):])
        if not finished or not calls:
            logger.warning("mistral: %s not followed by tool calls that parse; returning the output as content",
                           self.bot_token)
            return ExtractedToolCallInformation(tools_called=False, tool_calls=[], content=model_output)
        tool_calls = [ToolCall(id=self.make_tool_call_id(), function=FunctionCall(name=c.name, arguments=c.arguments))
                      for c in calls]
        return ExtractedToolCallInformation(tools_called=True, tool_calls=tool_calls,
                                            content=model_output[:start] or None)

    def _snapshot(self, text: str) -> tuple[str, list[ToolCallSnapshot]]:
        start = text.find(self.bot_token)
        if start == -1:
            return text[:len(text) - partial_marker_len(text, self.bot_token)], []
        calls, finished = self._parse_calls(text[start + len(self.bot_token):])
        if finished is None and not calls:
            return text, []  # will never parse: all content, as extract_tool_calls says
        return text[:start], calls



def _partial_value(text: str) -> Any:
    try:
        return partial_json_loads(text)
    except Exception:  # MalformedJSON, or the parser's own error on odd input
        return None


def _last_item_start(text: str) -> Optional[int]:
    """Where the last top-level item of an unfinished JSON list begins (the `{` after the last comma
    outside strings and nested values), or None if no item has begun."""
    depth, in_string, escaped, start = 0, False, False, None
    for i, ch in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth == 2:
                start = i
        elif ch in "]}":
            depth -= 1
    return start
