"""Helpers every tool parser shares: JSON arguments as OpenAI carries them, the part of a partial
JSON value that can already be sent, and the bookkeeping that turns successive views of a streamed
output into OpenAI's tool-call chunks."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Optional

import partial_json_parser
from partial_json_parser.core.options import Allow

from pagedllm.entrypoints.openai.protocol import DeltaFunctionCall, DeltaMessage, DeltaToolCall
from pagedllm.logger import init_logger

logger = init_logger(__name__)

# Characters a partial value's JSON may end with that the finished value need not have there:
# closers the partial parser added, and the digits/letters of a number or literal still being written.
_UNSTABLE_TAIL = '"]}0123456789.eE+-truefalsn'


def arguments_json(arguments: Any) -> str:
    """The `function.arguments` string for a parsed call: the arguments as JSON text. A model that
    already wrote them as a JSON string keeps that string; missing arguments are an empty object."""
    if arguments is None:
        return "{}"
    if isinstance(arguments, str):
        return arguments
    return json.dumps(arguments, ensure_ascii=False)


def partial_json_loads(text: str, allow: Allow = Allow.ALL) -> Any:
    """The value a prefix of JSON text holds so far (strings and containers closed), or raise."""
    return partial_json_parser.loads(text, allow)


def stable_arguments_prefix(partial_arguments: Any) -> str:
    """The longest text sure to begin `arguments_json` of the finished value, given the value parsed
    from a prefix. Cutting the closers and any trailing number or literal off the partial value's JSON
    leaves a prefix of the final JSON, because the partial parser only ever differs at the tail; cutting
    more is always safe, so this errs short. A lone surrogate (half of a `\\ud83d\\ude00` pair) ends it too."""
    if partial_arguments is None:
        return ""
    text = arguments_json(partial_arguments)
    if not isinstance(partial_arguments, str):
        text = text.rstrip(_UNSTABLE_TAIL)
    for i, ch in enumerate(text):
        if "\ud800" <= ch <= "\udfff":
            return text[:i]
    return text


def partial_marker_len(text: str, marker: str) -> int:
    """How many characters at the end of `text` could be the start of `marker` (held back from content
    until the next chunk shows whether the marker follows)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


def call_from_json_object(obj: Any) -> Optional[tuple[str, str]]:
    """(name, arguments JSON) for a `{"name": ..., "arguments"|"parameters": ...}` object, or None
    when it is not one (Llama 3 writes `parameters`, the others `arguments`)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    arguments = obj["arguments"] if "arguments" in obj else obj.get("parameters")
    return obj["name"], arguments_json(arguments)


@dataclass
class ToolCallSnapshot:
    """One call as far as the stream shows it: `name` once complete (None before), and `arguments`,
    a prefix of the call's final arguments JSON that will not change (the whole JSON once complete)."""

    name: Optional[str]
    arguments: str = ""


class ToolCallStreamer:
    """Turns successive snapshots (content so far, calls so far) into OpenAI chunks: content as it grows;
    a call's first chunk with `index`, `id`, `type` and the name; then only argument fragments."""

    def __init__(self, make_id: Callable[[], str]) -> None:
        self.make_id = make_id
        self.content_sent = 0
        self.tool_call_ids: list[str] = []
        self.arguments_sent: list[str] = []

    def delta(self, content: str, calls: list[ToolCallSnapshot]) -> Optional[DeltaMessage]:
        new_content = content[self.content_sent:]
        self.content_sent = max(self.content_sent, len(content))
        deltas: list[DeltaToolCall] = []
        for index, call in enumerate(calls):
            if index == len(self.tool_call_ids):
                if call.name is None:
                    break  # calls are sent in order: a later one waits for this name
                self.tool_call_ids.append(self.make_id())
                self.arguments_sent.append(call.arguments)
                deltas.append(DeltaToolCall(index=index, id=self.tool_call_ids[index], type="function",
                                            function=DeltaFunctionCall(name=call.name, arguments=call.arguments)))
                continue
            sent = self.arguments_sent[index]
            if len(call.arguments) > len(sent):
                if not call.arguments.startswith(sent):
                    logger.warning("tool call %d: arguments changed after being streamed; not sending more", index)
                    continue
                self.arguments_sent[index] = call.arguments
                deltas.append(DeltaToolCall(index=index,
                                            function=DeltaFunctionCall(arguments=call.arguments[len(sent):])))
        if not new_content and not deltas:
            return None
        return DeltaMessage(content=new_content or None, tool_calls=deltas)


def snapshot_partial_call_object(text: str) -> ToolCallSnapshot:
    """What can be sent of a `{"name": ..., "arguments": ...}` object whose text is still arriving: the
    name once its string is closed, and the stable part of the arguments after that."""
    try:
        # Without Allow.STR an unfinished string is left out, so a name present here is complete.
        closed = partial_json_loads(text, Allow.ALL & ~Allow.STR)
        name = closed.get("name") if isinstance(closed, dict) else None
        if not isinstance(name, str) or not name:
            return ToolCallSnapshot(name=None)
        obj = partial_json_loads(text)
    except Exception:  # MalformedJSON, or a parser error on odd input: nothing to send yet
        return ToolCallSnapshot(name=None)
    arguments = obj.get("arguments", obj.get("parameters")) if isinstance(obj, dict) else None
    return ToolCallSnapshot(name=name, arguments=stable_arguments_prefix(arguments))


def decode_json_prefix(text: str) -> Optional[tuple[Any, int]]:
    """The first complete JSON value at the start of `text` and where it ends, or None if the text
    does not (yet) start with one."""
    try:
        return json.JSONDecoder().raw_decode(text)
    except json.JSONDecodeError:
        return None
