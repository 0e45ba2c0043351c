"""What a server request's output must match: vLLM's `structured_outputs` field (completions and chat),
chat's `response_format`, and `tool_choice` "required" or a named function, which are enforced as a
JSON-schema constraint built from the tools (vLLM's way), so they work on any model.

Every mistake is a 400 naming the field, before any engine work.
"""

from __future__ import annotations

from typing import Any, Optional

from pagedllm.entrypoints.openai.errors import OpenAIError
from pagedllm.entrypoints.openai.protocol import ChatCompletionRequest, SamplingRequest
from pagedllm.sampling_params import StructuredOutputsParams


def structured_outputs_of(request: SamplingRequest) -> tuple[Optional[StructuredOutputsParams], str]:
    """The request's constraint, from whichever field set one (only one may), and that field's name (for
    the 400 of a constraint the grammar engine cannot build)."""
    found: list[tuple[str, StructuredOutputsParams]] = []
    if request.structured_outputs is not None:
        found.append(("structured_outputs", _params("structured_outputs", request.structured_outputs)))
    if isinstance(request, ChatCompletionRequest):
        fmt = _response_format(request.response_format)
        if fmt is not None:
            found.append(("response_format", fmt))
        tools = tool_choice_constraint(request)
        if tools is not None:
            found.append(("tool_choice", tools))
    if len(found) > 1:
        raise OpenAIError(f"{found[0][0]} and {found[1][0]} both constrain the output; use only one", 400,
                          param=found[1][0])
    return (found[0][1], found[0][0]) if found else (None, "structured_outputs")


def _params(field: str, value: Any) -> StructuredOutputsParams:
    if not isinstance(value, dict):
        raise OpenAIError(f"{field} must be an object", 400, param=field)
    try:
        return StructuredOutputsParams(**value)
    except TypeError as e:  # an unknown key
        raise OpenAIError(f"{field}: {e}".replace("__init__() ", ""), 400, param=field) from e
    except ValueError as e:
        raise OpenAIError(str(e), 400, param=field) from e


def _response_format(fmt: Optional[dict[str, Any]]) -> Optional[StructuredOutputsParams]:
    if fmt is None:
        return None
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise OpenAIError("response_format json_schema needs a 'json_schema' object with a 'schema' object",
                              400, param="response_format")
        # OpenAI's `strict` asks for what the grammar always does: the output matches the schema.
        return StructuredOutputsParams(json=spec.get("schema", {}))
    raise OpenAIError(f"response_format type must be 'text', 'json_object' or 'json_schema', got {kind!r}", 400,
                      param="response_format")


# ----- tools ----------------------------------------------------------------------------------
def check_tools(request: ChatCompletionRequest) -> None:
    """Each tool is `{"type": "function", "function": {"name": ..., "parameters": {...}}}`."""
    for i, tool in enumerate(request.tools or []):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(function, dict):
            raise OpenAIError("each tool must be {'type': 'function', 'function': {...}}", 400, param=f"tools.{i}")
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise OpenAIError("a tool's function needs a name", 400, param=f"tools.{i}.function.name")
        if not isinstance(function.get("parameters", {}), dict):
            raise OpenAIError("a tool's parameters must be a JSON schema object", 400,
                              param=f"tools.{i}.function.parameters")


def named_tool(request: ChatCompletionRequest) -> Optional[str]:
    """The function `tool_choice` names, if it names one."""
    choice = request.tool_choice
    if isinstance(choice, dict):
        function = choice.get("function")
        if choice.get("type", "function") != "function" or not isinstance(function, dict) \
                or not isinstance(function.get("name"), str):
            raise OpenAIError("tool_choice must be 'none', 'auto', 'required' or "
                              "{'type': 'function', 'function': {'name': ...}}", 400, param="tool_choice")
        return function["name"]
    return None


def tool_choice_constraint(request: ChatCompletionRequest) -> Optional[StructuredOutputsParams]:
    """`required`: a JSON array of one or more `{"name": ..., "parameters": {...}}` calls (one at most when
    `parallel_tool_calls` is false); a named function: that function's arguments object."""
    choice = request.tool_choice
    if choice is None or choice in ("none", "auto"):
        return None
    if isinstance(choice, str) and choice != "required":
        raise OpenAIError(f"tool_choice must be 'none', 'auto', 'required' or a named function, got {choice!r}",
                          400, param="tool_choice")
    if not request.tools:
        raise OpenAIError("tool_choice needs tools", 400, param="tool_choice")
    functions = {t["function"]["name"]: t["function"] for t in request.tools}
    name = named_tool(request)
    if name is not None:
        if name not in functions:
            raise OpenAIError(f"tool_choice names {name!r}, which is not among the tools", 400, param="tool_choice")
        return StructuredOutputsParams(json=_parameters(functions[name]))
    calls = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": [
        {"properties": {"name": {"type": "string", "enum": [n]}, "parameters": _parameters(f)},
         "required": ["name", "parameters"]} for n, f in functions.items()]}}
    if request.parallel_tool_calls is False:
        calls["maxItems"] = 1
    return StructuredOutputsParams(json=calls)


def _parameters(function: dict[str, Any]) -> dict[str, Any]:
    return function.get("parameters") or {"type": "object", "properties": {}}
