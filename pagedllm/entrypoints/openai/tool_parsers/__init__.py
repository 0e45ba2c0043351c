"""Tool-call parsers: model text → OpenAI `tool_calls`. Importing this package registers the built-in
parsers with `ToolParserManager` under the names vLLM's `--tool-call-parser` uses."""

from pagedllm.entrypoints.openai.tool_parsers.abstract_tool_parser import ToolParser, ToolParserManager
from pagedllm.entrypoints.openai.tool_parsers.hermes_tool_parser import Hermes2ProToolParser
from pagedllm.entrypoints.openai.tool_parsers.llama_tool_parser import Llama3JsonToolParser
from pagedllm.entrypoints.openai.tool_parsers.mistral_tool_parser import MistralToolParser

__all__ = ["ToolParser", "ToolParserManager", "Hermes2ProToolParser", "Llama3JsonToolParser", "MistralToolParser"]
