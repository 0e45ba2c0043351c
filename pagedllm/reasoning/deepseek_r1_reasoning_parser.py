"""`deepseek_r1`: DeepSeek-R1 (and its distills) reason before `</think>`.

R1's chat template ends the prompt with `<think>\\n`, so the output usually starts inside the
reasoning and only `</think>` appears; older templates let the model write `<think>` itself, which
is dropped. Until `</think>` comes, everything is reasoning.
"""

from __future__ import annotations

from pagedllm.reasoning.abs_reasoning_parsers import ReasoningParserManager
from pagedllm.reasoning.basic_parsers import BaseThinkingReasoningParser


@ReasoningParserManager.register("deepseek_r1")
class DeepSeekR1ReasoningParser(BaseThinkingReasoningParser):
    starts_in_reasoning = True
