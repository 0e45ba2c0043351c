"""The OpenAI API's request and response bodies (plus vLLM's extra sampling fields), as pydantic models.

Field names, types and defaults follow OpenAI's API reference; the extras (`top_k`, `min_p`,
`repetition_penalty`, `stop_token_ids`, `ignore_eos`, ...) follow vLLM's server, so a client written
for either works unchanged. Non-finite floats are rejected. A field vLLM's server has for a feature
pagedllm does not implement yet (`UNSUPPORTED_FIELDS`) is a 400 naming it unless it holds vLLM's
default, so a client never gets unconstrained output it did not ask for; a field no system defines
is ignored with a log line, as vLLM does.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import (BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, ValidationInfo,
                      field_validator, model_serializer, model_validator)
from pydantic_core import PydanticCustomError

# Seeds are passed to torch generators, which take 64-bit integers.
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
MAX_N = 128  # OpenAI's own limit on `n`


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


class OpenAIRequestModel(OpenAIBaseModel):
    """A request body. `null` for an optional field means "not given" (OpenAI's schema allows it for
    every optional field), and text must be valid Unicode: a lone surrogate (`"\\ud800"` in JSON)
    cannot be encoded, so it is refused here rather than failing deep in the tokenizer."""

    @model_validator(mode="before")
    @classmethod
    def _nulls_and_surrogates(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        where = _lone_surrogate(data)
        if where is not None:
            # A custom error, so that the 400 names the field (`param`) this whole-body check found.
            raise PydanticCustomError("lone_surrogate", "{param} holds a lone surrogate code point, which is not "
                                      "valid Unicode text", {"param": where or "the request"})
        return {k: v for k, v in data.items() if not (v is None and k in cls.model_fields)}


def _lone_surrogate(value: Any, path: str = "") -> Optional[str]:
    """The path of the first string (or key) holding a lone surrogate, else None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        child = f"{path}.{key}" if path else str(key)
        found = _lone_surrogate(key, child) if isinstance(key, str) else None
        if found is None:
            found = _lone_surrogate(item, child)
        if found is not None:
            return found
    return None


_STRUCTURED = "structured outputs"
_MM = "image, audio and video inputs"
# vLLM server fields for features pagedllm does not have yet -> (values that ask for nothing, the feature).
UNSUPPORTED_FIELDS: dict[str, tuple[tuple, str]] = {
    "guided_json": ((None,), _STRUCTURED),
    "guided_regex": ((None,), _STRUCTURED),
    "guided_choice": ((None,), _STRUCTURED),
    "guided_grammar": ((None,), _STRUCTURED),
    "guided_decoding_backend": ((None,), _STRUCTURED),
    "guided_whitespace_pattern": ((None,), _STRUCTURED),
    "use_beam_search": ((None, False), "beam search"),
    "length_penalty": ((None, 1.0), "beam search"),
    "priority": ((None, 0), "priority scheduling"),
    "truncate_prompt_tokens": ((None,), "prompt truncation"),
    "truncation_side": ((None,), "prompt truncation"),
    "bad_words": ((None, []), "bad-word lists"),
    "logprob_token_ids": ((None,), "logprobs of chosen token ids"),
    "prompt_embeds": ((None,), "prompt embeddings"),
    "watermarking": ((None, False), "watermarking"),
    "return_tokens_as_token_ids": ((None, False), "token ids in place of token text"),
    "return_token_ids": ((None, False), "token ids in responses"),
    "return_token_offsets": ((None, False), "token offsets in responses"),
    "return_prompt_text": ((None, False), "the prompt's text in responses"),
    "mm_processor_kwargs": ((None, {}), _MM),
    "media_io_kwargs": ((None, {}), _MM),
    "mm_payload": ((None,), _MM),
    "return_mm_kwargs": ((None,), _MM),
    "cache_salt": ((None,), "prefix-cache salts"),
    "kv_transfer_params": ((None,), "disaggregated prefill"),
    "ec_transfer_params": ((None,), "disaggregated prefill"),
    "vllm_xargs": ((None, {}), "extra arguments for custom logits processors"),
    "repetition_detection": ((None,), "repetition detection"),
    "thinking_token_budget": ((None,), "thinking-token budgets"),
    "reasoning_effort": ((None,), "reasoning models"),
    "documents": ((None,), "documents for the chat template"),
    "stream_interval": ((None, 1), "streaming in intervals"),
    "request_id": ((None,), "client-chosen request ids"),
    "session_id": ((None,), "sessions"),
    "routed_experts_prompt_start": ((None, 0), "routed-expert outputs"),
}


def unsupported_field(request: BaseModel) -> Optional[tuple[str, str]]:
    """The first field of `request` that asks for a feature pagedllm does not have: (name, feature)."""
    for name, value in (request.model_extra or {}).items():
        accepted, feature = UNSUPPORTED_FIELDS.get(name, ((), ""))
        if feature and value not in accepted:
            return name, feature
    return None


def ignored_fields(request: BaseModel) -> list[str]:
    """Extra fields no system defines (ignored, as vLLM does)."""
    return sorted(name for name in (request.model_extra or {}) if name not in UNSUPPORTED_FIELDS)


# ----- errors -------------------------------------------------------------------------
class ErrorInfo(OpenAIBaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(OpenAIBaseModel):
    error: ErrorInfo


# ----- shared pieces ------------------------------------------------------------------
class UsageInfo(OpenAIBaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class StreamOptions(OpenAIRequestModel):
    include_usage: Optional[bool] = False
    continuous_usage_stats: Optional[bool] = False  # vLLM: usage in every chunk


class ModelCard(OpenAIBaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "pagedllm"
    root: Optional[str] = None
    parent: Optional[str] = None
    max_model_len: Optional[int] = None


class ModelList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)


class SamplingRequest(OpenAIRequestModel):
    """The sampling fields completions and chat share. `None` means "the model's default"."""

    model: Optional[str] = None
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None
    seed: Optional[int] = Field(None, ge=_INT64_MIN, le=_INT64_MAX)
    stop: Optional[Union[str, list[str]]] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    # vLLM's extra sampling parameters
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    prompt_logprobs: Optional[int] = None
    allowed_token_ids: Optional[list[int]] = None
    # vLLM's structured outputs: {"json": schema} / {"regex": ...} / {"choice": [...]} / {"grammar": ...}
    structured_outputs: Optional[dict[str, Any]] = None

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_a_stream(cls, value: Optional["StreamOptions"], info: ValidationInfo) -> Any:
        # vLLM's rule: options for a stream that is not asked for are a mistake, not something to ignore
        # (an empty object asks for nothing).
        if value is not None and (value.model_fields_set or value.model_extra) and not info.data.get("stream"):
            raise ValueError("stream_options can only be set when stream is true")
        return value


# ----- /v1/completions ------------------------------------------------------------------
class CompletionRequest(SamplingRequest):
    prompt: Union[list[int], list[list[int]], str, list[str]]
    max_tokens: Optional[int] = 16
    logprobs: Optional[int] = None
    echo: bool = False
    best_of: Optional[int] = None
    suffix: Optional[str] = None
    add_special_tokens: bool = True


class CompletionLogProbs(OpenAIBaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[Optional[float]] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[Optional[dict[str, float]]] = Field(default_factory=list)


class CompletionResponseChoice(OpenAIBaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogProbs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None
    prompt_logprobs: Optional[list[Optional[dict[int, dict[str, Any]]]]] = None


class CompletionResponse(OpenAIBaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionResponseChoice]
    usage: UsageInfo
    system_fingerprint: Optional[str] = None


class CompletionResponseStreamChoice(OpenAIBaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogProbs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None


class CompletionStreamResponse(OpenAIBaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionResponseStreamChoice]
    usage: Optional[UsageInfo] = None


# ----- /v1/chat/completions -------------------------------------------------------------
class ChatMessageParam(OpenAIRequestModel):
    role: str
    content: Optional[Union[str, list[dict[str, Any]]]] = None
    name: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None
    tool_call_id: Optional[str] = None


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessageParam]
    max_tokens: Optional[int] = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = None
    response_format: Optional[dict[str, Any]] = None
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[Union[str, dict[str, Any]]] = None
    parallel_tool_calls: Optional[bool] = None
    # vLLM's chat extras
    echo: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template: Optional[str] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None


def _omit_empty(data: Any, fields: tuple[str, ...]) -> Any:
    """Drop the named fields while they hold None or an empty list: the tool-call and reasoning fields
    appear in a response only when a parser filled them, so a reply without tools stays exactly the
    shape OpenAI sends (and the server's earlier output) whatever `exclude_*` options dump it."""
    if isinstance(data, dict):
        for name in fields:
            if name in data and data[name] in (None, []):
                del data[name]
        if "reasoning_content" in data:
            # vLLM 0.32 names it `reasoning` (and reads `reasoning_content` as its deprecated alias):
            # both are sent, so clients written for either find it.
            data["reasoning"] = data["reasoning_content"]
    return data


class FunctionCall(OpenAIBaseModel):
    name: str
    arguments: str  # a JSON object, as text: what the model's call passes


def make_tool_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


class ToolCall(OpenAIBaseModel):
    id: str = Field(default_factory=make_tool_call_id)
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaFunctionCall(OpenAIBaseModel):
    name: Optional[str] = None
    arguments: Optional[str] = None

    @model_serializer(mode="wrap")
    def _openai_shape(self, handler: SerializerFunctionWrapHandler):
        return _omit_empty(handler(self), ("name", "arguments"))


class DeltaToolCall(OpenAIBaseModel):
    """One stream chunk of a tool call. The first for an `index` carries `id`, `type` and the name;
    later ones carry only `index` and the next piece of `function.arguments`, as OpenAI streams."""

    id: Optional[str] = None
    type: Optional[Literal["function"]] = None
    index: int
    function: Optional[DeltaFunctionCall] = None

    @model_serializer(mode="wrap")
    def _openai_shape(self, handler: SerializerFunctionWrapHandler):
        return _omit_empty(handler(self), ("id", "type", "function"))


class ExtractedToolCallInformation(OpenAIBaseModel):
    """What a tool parser found in a whole model output: the calls, and the text around them that is
    the message's content (None when there is none)."""

    tools_called: bool
    tool_calls: list[ToolCall]
    content: Optional[str] = None


class ChatMessage(OpenAIBaseModel):
    role: str
    content: Optional[str] = None
    reasoning_content: Optional[str] = None
    tool_calls: list[ToolCall] = Field(default_factory=list)

    @model_serializer(mode="wrap")
    def _openai_shape(self, handler: SerializerFunctionWrapHandler):
        return _omit_empty(handler(self), ("reasoning_content", "tool_calls"))


class ChatCompletionLogProb(OpenAIBaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class ChatCompletionLogProbsContent(ChatCompletionLogProb):
    top_logprobs: list[ChatCompletionLogProb] = Field(default_factory=list)


class ChatCompletionLogProbs(OpenAIBaseModel):
    content: Optional[list[ChatCompletionLogProbsContent]] = None


class ChatCompletionResponseChoice(OpenAIBaseModel):
    index: int
    message: ChatMessage
    logprobs: Optional[ChatCompletionLogProbs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None


class ChatCompletionResponse(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionResponseChoice]
    usage: UsageInfo
    system_fingerprint: Optional[str] = None
    prompt_logprobs: Optional[list[Optional[dict[int, dict[str, Any]]]]] = None


class DeltaMessage(OpenAIBaseModel):
    role: Optional[str] = None
    content: Optional[str] = None
    reasoning_content: Optional[str] = None
    tool_calls: list[DeltaToolCall] = Field(default_factory=list)

    @model_serializer(mode="wrap")
    def _openai_shape(self, handler: SerializerFunctionWrapHandler):
        return _omit_empty(handler(self), ("reasoning_content", "tool_calls"))


class ChatCompletionResponseStreamChoice(OpenAIBaseModel):
    index: int
    delta: DeltaMessage
    logprobs: Optional[ChatCompletionLogProbs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None


class ChatCompletionStreamResponse(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionResponseStreamChoice]
    usage: Optional[UsageInfo] = None


# ----- LoRA adapters at runtime (vLLM's, with VLLM_ALLOW_RUNTIME_LORA_UPDATING) ---------------------
class LoadLoRAAdapterRequest(OpenAIRequestModel):
    lora_name: str
    lora_path: str


class UnloadLoRAAdapterRequest(OpenAIRequestModel):
    lora_name: str
    lora_int_id: Optional[int] = None


# ----- /tokenize and /detokenize (vLLM's) -------------------------------------------------
class TokenizeRequest(OpenAIRequestModel):
    """Either `prompt` (completion-style) or `messages` (rendered with the chat template first)."""

    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessageParam]] = None
    add_special_tokens: Optional[bool] = None  # default: True for a prompt, False for messages
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: Optional[str] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None
    return_token_strs: bool = False


class TokenizeResponse(OpenAIBaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: Optional[list[str]] = None


class DetokenizeRequest(OpenAIRequestModel):
    model: Optional[str] = None
    tokens: list[int]


class DetokenizeResponse(OpenAIBaseModel):
    prompt: str
