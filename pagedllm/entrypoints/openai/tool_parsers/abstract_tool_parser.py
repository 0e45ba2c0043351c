"""The tool-parser interface the chat server calls, and the registry `--tool-call-parser` names.

A model announces a tool call in its own text format (`<tool_call>` tags, `[TOOL_CALLS]`, bare JSON);
a `ToolParser` turns that text into OpenAI's `tool_calls`, for a whole output (`extract_tool_calls`)
or chunk by chunk as it streams (`extract_tool_calls_streaming`). One instance serves one request
and one choice: the streaming method keeps state between calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

from pagedllm.entrypoints.openai.protocol import (ChatCompletionRequest, DeltaMessage,
                                                  ExtractedToolCallInformation, make_tool_call_id)
from pagedllm.entrypoints.openai.tool_parsers.utils import ToolCallSnapshot, ToolCallStreamer
from pagedllm.logger import init_logger
from pagedllm.utils import Registry

logger = init_logger(__name__)


class ToolParser:
    """Base class: subclasses implement the two `extract_*` methods for one model family's format.

    Streaming parsers usually describe what they can see so far as a `ToolCallSnapshot` list and let
    `self.streamer` turn the difference from the last call into a `DeltaMessage`, so that the OpenAI
    chunk rules (ids, names once, argument fragments that concatenate to the final JSON) live in one place.
    """

    def __init__(self, tokenizer) -> None:
        self.model_tokenizer = tokenizer
        self.streamer = ToolCallStreamer(self.make_tool_call_id)

    @property
    def vocab(self) -> dict[str, int]:
        return self.model_tokenizer.get_vocab()

    def make_tool_call_id(self) -> str:
        """A fresh id for a call; Mistral's format needs its own."""
        return make_tool_call_id()

    def adjust_request(self, request: ChatCompletionRequest) -> ChatCompletionRequest:
        """Change the request before generation when the format needs it (e.g. keep special tokens
        in the text when the markers are special tokens). The default leaves it alone."""
        return request

    def extract_tool_calls(self, model_output: str, request: ChatCompletionRequest) -> ExtractedToolCallInformation:
        """Find the calls in a whole output. Never raises: an output that does not parse is content."""
        raise NotImplementedError

    def extract_tool_calls_streaming(self, previous_text: str, current_text: str, delta_text: str,
                                     previous_token_ids: Sequence[int], current_token_ids: Sequence[int],
                                     delta_token_ids: Sequence[int],
                                     request: ChatCompletionRequest) -> Optional[DeltaMessage]:
        """The next chunk to send for an output that grew from `previous_text` to `current_text`, or
        None when nothing can be sent yet (e.g. a call's name is still incomplete). Never raises.

        The default describes `current_text` with `_snapshot` and lets the streamer send the difference."""
        try:
            return self._stream_snapshot(*self._snapshot(current_text))
        except Exception:
            logger.exception("%s: error while streaming tool calls; skipping this chunk", type(self).__name__)
            return None

    def _snapshot(self, text: str) -> tuple[str, list[ToolCallSnapshot]]:
        """(content so far, the calls seen so far) of a partial output."""
        raise NotImplementedError

    def _stream_snapshot(self, content: str, calls: list[ToolCallSnapshot]) -> Optional[DeltaMessage]:
        return self.streamer.delta(content, calls)


# Name -> ToolParser class, filled by `@ToolParserManager.register(name)` when a parser module is imported.
ToolParserManager: Registry[type[ToolParser]] = Registry("tool parser", ToolParser)
