"""Reasoning parsers: split a reasoning model's output into `reasoning_content` and `content`.
Importing this package registers the built-in parsers with `ReasoningParserManager` under the
names vLLM's `--reasoning-parser` uses."""

from pagedllm.reasoning.abs_reasoning_parsers import ReasoningParser, ReasoningParserManager
from pagedllm.reasoning.basic_parsers import BaseThinkingReasoningParser
from pagedllm.reasoning.deepseek_r1_reasoning_parser import DeepSeekR1ReasoningParser
from pagedllm.reasoning.qwen3_reasoning_parser import Qwen3ReasoningParser

__all__ = ["ReasoningParser", "ReasoningParserManager", "BaseThinkingReasoningParser",
           "DeepSeekR1ReasoningParser", "Qwen3ReasoningParser"]
