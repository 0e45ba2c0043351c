"""`qwen3`: Qwen3 and QwQ write `<think>...</think>` before the answer.

Hybrid Qwen3 models open the block themselves (`<think>\\n...`) when thinking is on; with
`enable_thinking=False` the template closes an empty block in the prompt and the output is all
content. Qwen3-*-Thinking-2507 templates open the block in the prompt, so the output has only
`</think>`: the server says so through `adjust_initial_state_from_prompt`. Without that call, an
output with `</think>` but no `<think>` still splits there when parsed whole, as vLLM's parser
does, while a stream (which cannot wait for `</think>`) sends it all as content.
"""

from __future__ import annotations

from typing import Optional

from pagedllm.entrypoints.openai.protocol import ChatCompletionRequest
from pagedllm.reasoning.abs_reasoning_parsers import ReasoningParserManager
from pagedllm.reasoning.basic_parsers import BaseThinkingReasoningParser


@ReasoningParserManager.register("qwen3")
class Qwen3ReasoningParser(BaseThinkingReasoningParser):
    starts_in_reasoning = False

    def extract_reasoning_content(self, model_output: str,
                                  request: Optional[ChatCompletionRequest]) -> tuple[Optional[str], Optional[str]]:
        if not model_output.startswith(self.start_token) and self.end_token in model_output:
            reasoning, _, content = model_output.partition(self.end_token)
            return reasoning or None, content or None
        return super().extract_reasoning_content(model_output, request)
