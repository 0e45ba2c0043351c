"""The reasoning-parser interface and the registry `--reasoning-parser` names.

A reasoning model writes its chain of thought before the answer, between markers such as
`<think>...</think>`. A `ReasoningParser` splits the output into `reasoning_content` and `content`,
for a whole output or chunk by chunk, and tells the engine from token ids when the reasoning has
ended, so that a structured-output grammar constrains only the answer. One instance serves one
request and one choice: the streaming method keeps state between calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

from pagedllm.entrypoints.openai.protocol import ChatCompletionRequest, DeltaMessage
from pagedllm.utils import Registry


class ReasoningParser:
    """Base class: subclasses implement the four methods below for one model family's markers."""

    def __init__(self, tokenizer) -> None:
        self.model_tokenizer = tokenizer

    @property
    def vocab(self) -> dict[str, int]:
        return self.model_tokenizer.get_vocab()

    def is_reasoning_end(self, input_ids: Sequence[int]) -> bool:
        """Whether the reasoning is over at the end of `input_ids` (prompt and output so far), so a
        constraint on the answer may start."""
        raise NotImplementedError

    def extract_content_ids(self, input_ids: list[int]) -> list[int]:
        """The output token ids that belong to the answer (after the reasoning)."""
        raise NotImplementedError

    def extract_reasoning_content(self, model_output: str,
                                  request: Optional[ChatCompletionRequest]) -> tuple[Optional[str], Optional[str]]:
        """(reasoning, content) of a whole output; either is None when empty."""
        raise NotImplementedError

    def extract_reasoning_content_streaming(self, previous_text: str, current_text: str, delta_text: str,
                                            previous_token_ids: Sequence[int], current_token_ids: Sequence[int],
                                            delta_token_ids: Sequence[int]) -> Optional[DeltaMessage]:
        """The next chunk (`reasoning_content` and/or `content`) for an output that grew from
        `previous_text` to `current_text`, or None when nothing can be sent yet."""
        raise NotImplementedError


# Name -> ReasoningParser class, filled by `@ReasoningParserManager.register(name)` when a parser module is imported.
ReasoningParserManager: Registry[type[ReasoningParser]] = Registry("reasoning parser", ReasoningParser)
