"""`BaseThinkingReasoningParser`: the reasoning sits between a start and an end token
(`<think>`/`</think>`), and the output may or may not repeat the start token (chat templates
often put it in the prompt)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

from pagedllm.entrypoints.openai.protocol import ChatCompletionRequest, DeltaMessage
from pagedllm.reasoning.abs_reasoning_parsers import ReasoningParser

_UNDECIDED, _REASONING, _CONTENT = "undecided", "reasoning", "content"


class BaseThinkingReasoningParser(ReasoningParser):
    """Splits output at the start and end tokens. Streaming and non-streaming run the same rules:

    - an output that starts with the start token is reasoning up to the end token;
    - otherwise it is reasoning up to the end token if the reasoning was already open when the output
      began (`starts_in_reasoning`: the class default, or what `adjust_initial_state_from_prompt` saw),
      and content if not;
    - reasoning that never ends (generation cut off) is all reasoning.
    """

    start_token: str = "<think>"
    end_token: str = "</think>"
    starts_in_reasoning: bool = False

    def __init__(self, tokenizer) -> None:
        super().__init__(tokenizer)
        vocab = self.vocab
        missing = [t for t in (self.start_token, self.end_token) if t not in vocab]
        if missing:
            raise ValueError(f"{type(self).__name__} needs {' and '.join(map(repr, missing))} as tokens in the "
                             "tokenizer's vocabulary; this tokenizer is not for a model this parser knows")
        self.start_token_id: int = vocab[self.start_token]
        self.end_token_id: int = vocab[self.end_token]
        self._state = _UNDECIDED
        self._sent = 0  # how much of current_text the stream has handed out

    def adjust_initial_state_from_prompt(self, prompt_token_ids: Sequence[int]) -> None:
        """Note whether the chat template left a reasoning block open at the end of the prompt
        (Qwen3-Thinking and DeepSeek-R1 templates end with `<think>\\n`; Qwen3 with
        `enable_thinking=False` ends with an empty, closed block). Call before parsing the output."""
        for token_id in reversed(prompt_token_ids):
            if token_id == self.start_token_id:
                self.starts_in_reasoning = True
                return
            if token_id == self.end_token_id:
                self.starts_in_reasoning = False
                return

    def is_reasoning_end(self, input_ids: Sequence[int]) -> bool:
        for token_id in reversed(input_ids):
            if token_id == self.end_token_id:
                return True
            if token_id == self.start_token_id:
                return False
        return False

    def extract_content_ids(self, input_ids: list[int]) -> list[int]:
        if self.end_token_id not in input_ids[:-1]:
            return []
        return input_ids[input_ids.index(self.end_token_id) + 1:]

    def extract_reasoning_content(self, model_output: str,
                                  request: Optional[ChatCompletionRequest]) -> tuple[Optional[str], Optional[str]]:
        if model_output.startswith(self.start_token):
            model_output = model_output[len(self.start_token):]
        elif not self.starts_in_reasoning:
            return None, model_output or None
        reasoning, end, content = model_output.partition(self.end_token)
        return reasoning or None, (content or None) if end else None

    def extract_reasoning_content_streaming(self, previous_text: str, current_text: str, delta_text: str,
                                            previous_token_ids: Sequence[int], current_token_ids: Sequence[int],
                                            delta_token_ids: Sequence[int]) -> Optional[DeltaMessage]:
        text = current_text
        if self._state == _UNDECIDED:
            if text.startswith(self.start_token):
                self._state, self._sent = _REASONING, len(self.start_token)
            elif self.start_token.startswith(text):
                return None  # the start token may still be arriving
            else:
                self._state = _REASONING if self.starts_in_reasoning else _CONTENT
        reasoning = ""
        if self._state == _REASONING:
            end = text.find(self.end_token, self._sent)
            if end == -1:
                # Hold back a tail that could be the start of the end token.
                safe = max(self._sent, len(text) - _partial_marker_len(text, self.end_token))
                reasoning, self._sent = text[self._sent:safe], safe
            else:
                reasoning = text[self._sent:end]
                self._state, self._sent = _CONTENT, end + len(self.end_token)
        content = ""
        if self._state == _CONTENT:
            content, self._sent = text[self._sent:], len(text)
        if not reasoning and not content:
            return None
        return DeltaMessage(reasoning_content=reasoning or None, content=content or None)


def _partial_marker_len(text: str, marker: str) -> int:
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
