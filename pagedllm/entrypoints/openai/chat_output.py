"""One chat choice's text, split into what OpenAI's fields carry: `reasoning_content` (with
`--reasoning-parser`), `content`, and `tool_calls` (from `tool_choice` "required" or a named function,
whose output the grammar shaped, or from the model's own format with `--enable-auto-tool-choice
--tool-call-parser`); whole (`message`) or as a stream of deltas (`delta`, then `finish`).

One `ChoiceOutput` per choice: the parsers keep streaming state.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from pagedllm.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    ToolCall,
    make_tool_call_id,
)

_ROLE = "assistant"


class ChoiceOutput:
    def __init__(self, request: ChatCompletionRequest, tokenizer: Any, prompt_token_ids: list[int],
                 reasoning_parser_cls: Optional[type] = None, tool_parser_cls: Optional[type] = None,
                 named_tool: Optional[str] = None) -> None:
        self.request = request
        self.reasoning = reasoning_parser_cls(tokenizer) if reasoning_parser_cls is not None else None
        if self.reasoning is not None and hasattr(self.reasoning, "adjust_initial_state_from_prompt"):
            self.reasoning.adjust_initial_state_from_prompt(prompt_token_ids)
        self.required = request.tool_choice == "required" and bool(request.tools)
        self.named_tool = named_tool
        # Given only when the request's tools are parsed from the model's own format (tool_choice auto).
        self.tool_parser = tool_parser_cls(tokenizer) if tool_parser_cls is not None else None
        self.tools_called = False
        # streaming state
        self._text = ""
        self._ids: list[int] = []
        self._content = ""  # the text after the reasoning
        self._content_ids: list[int] = []
        self._named_id = make_tool_call_id()
        self._named_started = False

    # ----- a whole answer ------------------------------------------------------------------
    def message(self, text: str) -> ChatMessage:
        reasoning, content = None, text
        if self.reasoning is not None:
            reasoning, content = self.reasoning.extract_reasoning_content(text, self.request)
        content = content or ""
        if self.named_tool is not None:
            self.tools_called = True
            return ChatMessage(role=_ROLE, content="", reasoning_content=reasoning, tool_calls=[
                ToolCall(id=self._named_id, function=FunctionCall(name=self.named_tool, arguments=content))])
        if self.required:
            calls = required_calls(content)
            if calls is not None:
                self.tools_called = True
                return ChatMessage(role=_ROLE, content="", reasoning_content=reasoning, tool_calls=calls)
        if self.tool_parser is not None:
            extracted = self.tool_parser.extract_tool_calls(content, self.request)
            if extracted.tools_called:
                self.tools_called = True
                return ChatMessage(role=_ROLE, content=extracted.content or None, reasoning_content=reasoning,
                                   tool_calls=extracted.tool_calls)
        return ChatMessage(role=_ROLE, content=content, reasoning_content=reasoning)

    def finish_reason(self, engine_reason: Optional[str]) -> Optional[str]:
        """OpenAI's: "tool_calls" when auto or required calls came back (a named call keeps "stop")."""
        if engine_reason == "stop" and self.tools_called and self.named_tool is None:
            return "tool_calls"
        return engine_reason

    # ----- a stream ---------------------------------------------------------------------------
    def delta(self, delta_text: str, delta_ids: list[int]) -> Optional[DeltaMessage]:
        """The delta to send for the next piece of output, or None when nothing is due yet."""
        previous_text, previous_ids = self._text, self._ids
        self._text, self._ids = self._text + delta_text, self._ids + delta_ids
        content_delta, out = delta_text, DeltaMessage()
        if self.reasoning is not None:
            parsed = self.reasoning.extract_reasoning_content_streaming(
                previous_text, self._text, delta_text, previous_ids, self._ids, delta_ids)
            if parsed is None:
                return None
            out.reasoning_content = parsed.reasoning_content
            content_delta = parsed.content or ""
        if content_delta:
            out = self._content_delta(content_delta, delta_ids, out)
        if out.reasoning_content is None and out.content is None and not out.tool_calls:
            return None
        return out

    def _content_delta(self, text: str, ids: list[int], out: DeltaMessage) -> DeltaMessage:
        previous, previous_ids = self._content, self._content_ids
        self._content, self._content_ids = self._content + text, self._content_ids + ids
        if self.named_tool is not None:  # the output is the arguments, streamed as they come
            self.tools_called = True
            call = DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=text))
            if not self._named_started:
                self._named_started = True
                call = DeltaToolCall(index=0, id=self._named_id, type="function",
                                     function=DeltaFunctionCall(name=self.named_tool, arguments=text))
            out.tool_calls = [call]
        elif self.required:
            pass  # a JSON array of calls: sent whole by `finish`, once it parses
        elif self.tool_parser is not None:
            parsed = self.tool_parser.extract_tool_calls_streaming(
                previous, self._content, text, previous_ids, self._content_ids, ids, self.request)
            if parsed is not None:
                out.content = parsed.content
                if parsed.tool_calls:
                    self.tools_called = True
                    out.tool_calls = parsed.tool_calls
        else:
            out.content = text
        return out

    def finish(self) -> Optional[DeltaMessage]:
        """What is left to send when the choice ends: the calls of `tool_choice` "required"."""
        if not self.required:
            return None
        calls = required_calls(self._content)
        if calls is None:
            return DeltaMessage(content=self._content) if self._content else None
        self.tools_called = True
        return DeltaMessage(tool_calls=[
            DeltaToolCall(index=i, id=c.id, type="function",
                          function=DeltaFunctionCall(name=c.function.name, arguments=c.function.arguments))
            for i, c in enumerate(calls)])


def required_calls(text: str) -> Optional[list[ToolCall]]:
    """The calls in a `tool_choice="required"` output (`[{"name": ..., "parameters": {...}}, ...]`, the
    shape its grammar enforces); None if it does not parse (cut off by max_tokens)."""
    try:
        items = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(items, list) or not all(isinstance(i, dict) and "name" in i for i in items):
        return None
    return [ToolCall(id=make_tool_call_id(), function=FunctionCall(
        name=i["name"], arguments=json.dumps(i.get("parameters", {}), ensure_ascii=False))) for i in items]
