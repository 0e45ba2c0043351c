"""`llama3_json`: Llama 3.1/3.2/3.3's JSON tool calls (the format of vLLM's llama3.x JSON chat templates).

    <|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": ...}

The output is a call only if it starts with `{` (after an optional `<|python_tag|>`); each object
needs a `name` and takes its arguments from `parameters` or `arguments`. An output that starts some
other way (plain text, or `<|python_tag|>` Python for a built-in tool) is content, and so is JSON
that is not a call (a `{"answer": 42}` reply). Text after the last object is dropped.
"""

from __future__ import annotations

from typing import Optional

from pagedllm.entrypoints.openai.protocol import (ChatCompletionRequest,
                                                  ExtractedToolCallInformation, FunctionCall, ToolCall)
from pagedllm.entrypoints.openai.tool_parsers.abstract_tool_parser import ToolParser, ToolParserManager
from pagedllm.entrypoints.openai.tool_parsers.utils import (ToolCallSnapshot, call_from_json_object,
                                                           decode_json_prefix, snapshot_partial_call_object)
from pagedllm.logger import init_logger

logger = init_logger(__name__)


@ToolParserManager.register("llama3_json")
class Llama3JsonToolParser(ToolParser):
    bot_token = "<|python_tag|>"

    def _body(self, text: str) -> Optional[str]:
        """The text after the optional `<|python_tag|>`; None while that marker is still arriving."""
        text = text.lstrip()
        if len(text) < len(self.bot_token) and self.bot_token.startswith(text):
            return None
        if text.startswith(self.bot_token):
            text = text[len(self.bot_token):].lstrip()
        return text

    def _parse(self, body: str) -> tuple[Optional[list[ToolCallSnapshot]], bool]:
        """The `;`-separated calls in `body` (None when the output is content, not calls), and whether
        the last one is finished. Parsing stops at the first text that is not `; {`."""
        calls: list[ToolCallSnapshot] = []
        pos = 0
        while True:
            decoded = decode_json_prefix(body[pos:])
            if decoded is None:  # unfinished (or broken) JSON
                calls.append(snapshot_partial_call_object(body[pos:]))
                return calls, False
            obj, length = decoded
            call = call_from_json_object(obj)
            if call is None:
                return calls or None, True
            calls.append(ToolCallSnapshot(*call))
            after = body[pos + length:].lstrip()
            if not after.startswith(";"):
                return calls, True
            after = after[1:].lstrip()
            if not after.startswith("{"):
                return calls, True
            pos = len(body) - len(after)

    def extract_tool_calls(self, model_output: str, request: ChatCompletionRequest) -> ExtractedToolCallInformation:
        body = self._body(model_output)
        calls, finished = None, False
        if body and body.startswith("{"):
            calls, finished = self._parse(body)
        if not calls or not finished:
            if calls:
                logger.warning("llama3_json: output starts like a JSON call but does not parse; returning it as content")
            return ExtractedToolCallInformation(tools_called=False, tool_calls=[], content=model_output)
        tool_calls = [ToolCall(id=self.make_tool_call_id(), function=FunctionCall(name=c.name, arguments=c.arguments))
                      for c in calls]
        return ExtractedToolCallInformation(tools_called=True, tool_calls=tool_calls, content=None)

    def _snapshot(self, text: str) -> tuple[str, list[ToolCallSnapshot]]:
        body = self._body(text)
        if body is None or not body:
            return "", []
        if not body.startswith("{"):
            return text, []
        calls, _ = self._parse(body)
        if calls is None:
            return text, []
        return "", calls

