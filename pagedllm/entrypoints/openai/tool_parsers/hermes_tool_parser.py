"""`hermes`: the Hermes 2 Pro format that Qwen2.5, Qwen3 and QwQ chat templates also use.

    Let me look that up.<tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>
    <tool_call>
    ...

Text before the first `<tool_call>` is the message content; text after the last call is dropped, as
vLLM does. A call whose closing tag never came still counts if its JSON is complete (generation
stopped on the end-of-turn token right before `</tool_call>`).
"""

from __future__ import annotations

import json

from pagedllm.entrypoints.openai.protocol import (ChatCompletionRequest,
                                                  ExtractedToolCallInformation, FunctionCall, ToolCall)
from pagedllm.entrypoints.openai.tool_parsers.abstract_tool_parser import ToolParser, ToolParserManager
from pagedllm.entrypoints.openai.tool_parsers.utils import (ToolCallSnapshot, call_from_json_object,
                                                           partial_marker_len, snapshot_partial_call_object)
from pagedllm.logger import init_logger

logger = init_logger(__name__)


@ToolParserManager.register("hermes")
class Hermes2ProToolParser(ToolParser):
    tool_call_start_token = "<tool_call>"
    tool_call_end_token = "</tool_call>"

    def adjust_request(self, request: ChatCompletionRequest) -> ChatCompletionRequest:
        # Some checkpoints mark <tool_call> as a special token; skipping special tokens in the
        # detokenizer would then erase the markers before this parser sees the text.
        if request.tools and request.tool_choice != "none":
            return request.model_copy(update={"skip_special_tokens": False})
        return request

    def _call_bodies(self, text: str) -> list[tuple[str, bool]]:
        """Each `<tool_call>` region's text and whether its closing tag has arrived."""
        bodies = []
        pos = text.find(self.tool_call_start_token)
        while pos != -1:
            start = pos + len(self.tool_call_start_token)
            end = text.find(self.tool_call_end_token, start)
            if end == -1:
                bodies.append((text[start:], False))
                break
            bodies.append((text[start:end], True))
            pos = text.find(self.tool_call_start_token, end + len(self.tool_call_end_token))
        return bodies

    def extract_tool_calls(self, model_output: str, request: ChatCompletionRequest) -> ExtractedToolCallInformation:
        start = model_output.find(self.tool_call_start_token)
        if start == -1:
            return ExtractedToolCallInformation(tools_called=False, tool_calls=[], content=model_output)
        tool_calls = []
        for body, _ in self._call_bodies(model_output):
            try:
                call = call_from_json_object(json.loads(body))
            except json.JSONDecodeError:
                call = None
            if call is None:
                logger.warning("hermes: a <tool_call> that is not a JSON call; returning the output as content")
                return ExtractedToolCallInformation(tools_called=False, tool_calls=[], content=model_output)
            tool_calls.append(ToolCall(id=self.make_tool_call_id(),
                                       function=FunctionCall(name=call[0], arguments=call[1])))
        return ExtractedToolCallInformation(tools_called=True, tool_calls=tool_calls,
                                            content=model_output[:start] or None)

    def _snapshot(self, text: str) -> tuple[str, list[ToolCallSnapshot]]:
        start = text.find(self.tool_call_start_token)
        if start == -1:
            return text[:len(text) - partial_marker_len(text, self.tool_call_start_token)], []
        calls = []
        for body, closed in self._call_bodies(text):
            if not closed:
                body = body[:len(body) - partial_marker_len(body, self.tool_call_end_token)]
            try:
                call = call_from_json_object(json.loads(body))
                complete = True
            except json.JSONDecodeError:
                call, complete = None, closed
            if complete and call is None:
                # A finished call that is not a JSON call: the non-streaming answer is all content,
                # which the stream can still match unless it has already sent a call.
                return (text, []) if not self.streamer.tool_call_ids else (text[:start], calls)
            calls.append(ToolCallSnapshot(*call) if call else snapshot_partial_call_object(body.strip()))
        return text[:start], calls

