"""`POST /v1/chat/completions`: messages through the chat template, answers streamed or not.

A stream opens with one role delta per choice (`{"role": "assistant", "content": ""}`), then
content deltas, the finish reason on the last one, the usage chunk when
`stream_options.include_usage` asks for it, and `data: [DONE]`, exactly as OpenAI sends them.
"""

from __future__ import annotations

import functools

import json
import time
from typing import Any, AsyncGenerator, Optional, Union

from fastapi.responses import StreamingResponse

from pagedllm.engine.async_llm import EngineDeadError, RequestFailedError
from pagedllm.entrypoints.openai.chat_output import ChoiceOutput
from pagedllm.entrypoints.openai.constraints import check_tools, named_tool, structured_outputs_of
from pagedllm.entrypoints.openai.errors import OpenAIError, from_engine_error
from pagedllm.entrypoints.openai.limits import check_request_limits
from pagedllm.entrypoints.openai.protocol import (
    ChatCompletionLogProb,
    ChatCompletionLogProbs,
    ChatCompletionLogProbsContent,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChatCompletionStreamResponse,
    DeltaMessage,
    UsageInfo,
)
from pagedllm.entrypoints.openai.serving_engine import (
    SSE_DONE,
    EnginePrompt,
    OpenAIServing,
    merge_async_iterators,
    random_id,
    serialize_prompt_logprobs,
    sse,
    token_text,
    top_entries,
)
from pagedllm.engine.input_processor import ProcessedRequest
from pagedllm.entrypoints.openai.tool_parsers import ToolParserManager
from pagedllm.reasoning import ReasoningParserManager

_ROLE = "assistant"
_MIN_LOGPROB = -9999.0  # JSON has no -inf


class OpenAIServingChat(OpenAIServing):
    """`tool_call_parser` (with `enable_auto_tool_choice`) and `reasoning_parser` name the parsers of the
    model's own output formats (`tool_parsers/`, `pagedllm/reasoning/`)."""

    def __init__(self, *args: Any, enable_auto_tool_choice: bool = False, tool_call_parser: Optional[str] = None,
                 reasoning_parser: Optional[str] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tool_parser_cls = ToolParserManager.get(tool_call_parser) if enable_auto_tool_choice else None
        self.reasoning_parser_cls = ReasoningParserManager.get(reasoning_parser) if reasoning_parser else None
        # Checked now, so that a tokenizer without <think> fails the server's start, not each request.
        self.reasoning_end_token_id = (self.reasoning_parser_cls(self.tokenizer).end_token_id
                                       if self.reasoning_parser_cls is not None else None)

    async def create_chat_completion(
        self, request: ChatCompletionRequest,
    ) -> Union[ChatCompletionResponse, StreamingResponse]:
        lora_request = self.check_model(request.model)
        self.check_engine()
        self._check_request(request)
        tool_parser_cls = self._auto_tool_parser(request)
        if tool_parser_cls is not None:
            request = tool_parser_cls(self.tokenizer).adjust_request(request)
        constraint, constraint_field = structured_outputs_of(request)
        check_request_limits(self.limits, request, num_prompts=1)
        prompt = await self.off_the_event_loop(self._render_and_tokenize, request)
        if request.max_completion_tokens is not None:
            param, requested = "max_completion_tokens", request.max_completion_tokens
        else:
            param, requested = "max_tokens", request.max_tokens
        logprobs = None
        if request.logprobs:
            logprobs = request.top_logprobs or 0
        params = self.sampling_params(request, self.default_max_tokens(requested), logprobs, request.prompt_logprobs)
        params.structured_outputs = constraint
        request_id = random_id("chatcmpl")
        rename = {"prompt": "messages", "multi_modal_data": "messages", "logprobs": "top_logprobs",
                  "structured_outputs": constraint_field}
        process = functools.partial(self.process, request_id, prompt, params,
                                    param if requested is not None else None, rename=rename, lora_request=lora_request)
        # Images are decoded, preprocessed (and fetched, from an allowed domain) in a worker thread.
        processed = await self.off_the_event_loop(process) if prompt.images else process()
        if constraint is not None and self.reasoning_parser_cls is not None:
            self._constrain_after_reasoning(processed, prompt.token_ids)
        echo = ""
        if request.echo and request.messages[-1].role == _ROLE:
            echo = self.render_content(request.messages[-1])
        if request.stream:
            return StreamingResponse(self._stream(request, prompt, processed, echo), media_type="text/event-stream")
        return await self._full(request, prompt, processed, echo)

    def _check_request(self, request: ChatCompletionRequest) -> None:
        check_tools(request)
        if request.tool_choice == "auto" and self.tool_parser_cls is None:
            raise OpenAIError('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set',
                              400, param="tool_choice")
        if request.top_logprobs is not None and not request.logprobs:
            raise OpenAIError("top_logprobs needs logprobs to be true", 400, param="top_logprobs")

    def _constrain_after_reasoning(self, processed: ProcessedRequest, prompt_token_ids: list[int]) -> None:
        """A reasoning model thinks freely; its constraint starts after the token that ends the thinking
        (unless the prompt already ended it, as a template with thinking switched off does)."""
        parser = self.reasoning_parser_cls(self.tokenizer)
        if hasattr(parser, "adjust_initial_state_from_prompt"):
            parser.adjust_initial_state_from_prompt(prompt_token_ids)
        if parser.is_reasoning_end(prompt_token_ids):
            return
        for core_request in processed.core_requests:
            core_request.reasoning_end_token_id = self.reasoning_end_token_id

    def _auto_tool_parser(self, request: ChatCompletionRequest) -> Optional[type]:
        """The --tool-call-parser, when this request's tool calls are to be read from the model's own
        format (tools given, tool_choice auto or absent); None otherwise."""
        if request.tools and request.tool_choice in (None, "auto"):
            return self.tool_parser_cls
        return None

    def _choice_outputs(self, request: ChatCompletionRequest, prompt: EnginePrompt) -> list[ChoiceOutput]:
        return [ChoiceOutput(request, self.tokenizer, prompt.token_ids, self.reasoning_parser_cls,
                             self._auto_tool_parser(request), named_tool(request)) for _ in range(request.n)]

    def _render_and_tokenize(self, request: ChatCompletionRequest) -> EnginePrompt:
        text, images = self.render_chat(request.messages, request.add_generation_prompt,
                                        request.continue_final_message, request.chat_template,
                                        request.chat_template_kwargs, request.tools)
        prompt = self.tokenize(text, request.add_special_tokens)
        prompt.images = images or None
        return prompt

    def render_content(self, message) -> str:
        content = message.content
        if isinstance(content, list):
            return "\n".join(p.get("text", "") for p in content)
        return content or ""

    # ----- one JSON answer --------------------------------------------------------------
    async def _full(self, request: ChatCompletionRequest, prompt: EnginePrompt, processed: ProcessedRequest,
                    echo: str) -> ChatCompletionResponse:
        n, request_id, params = request.n, processed.request_id, processed.params
        texts, token_ids = [echo] * n, [[] for _ in range(n)]
        steps: list[list] = [[] for _ in range(n)]
        finish: list[tuple] = [(None, None)] * n
        prompt_logprobs = None
        generator = self.engine.stream(processed)
        try:
            async for _, output in merge_async_iterators([generator]):
                prompt_logprobs = prompt_logprobs or output.prompt_logprobs
                for o in output.outputs:
                    texts[o.index] += o.text
                    token_ids[o.index] += o.token_ids
                    steps[o.index] += o.logprobs or []
                    finish[o.index] = (o.finish_reason, o.stop_reason)
        except (RequestFailedError, EngineDeadError) as e:
            raise from_engine_error(e) from e
        parsers = self._choice_outputs(request, prompt)
        messages = [parsers[j].message(texts[j]) for j in range(n)]
        choices = [
            ChatCompletionResponseChoice(
                index=j, message=messages[j],
                logprobs=self._logprobs(token_ids[j], steps[j], params.logprobs),
                finish_reason=parsers[j].finish_reason(finish[j][0]), stop_reason=finish[j][1],
            )
            for j in range(n)
        ]
        completion_tokens = sum(len(t) for t in token_ids)
        return ChatCompletionResponse(
            id=request_id, model=self.response_model(request.model), choices=choices,
            usage=_usage(len(prompt.token_ids), completion_tokens),
            prompt_logprobs=serialize_prompt_logprobs(prompt_logprobs) if request.prompt_logprobs is not None else None,
        )

    # ----- Server-Sent Events -----------------------------------------------------------
    async def _stream(self, request: ChatCompletionRequest, prompt: EnginePrompt, processed: ProcessedRequest,
                      echo: str) -> AsyncGenerator[str, None]:
        n, created = request.n, int(time.time())
        request_id, params = processed.request_id, processed.params
        options = request.stream_options
        include_usage = bool(options and options.include_usage)
        continuous_usage = include_usage and bool(options.continuous_usage_stats)
        num_prompt_tokens = len(prompt.token_ids)
        completion_tokens = 0

        def chunk(index: int, delta: DeltaMessage, logprobs=None, finish_reason=None, stop_reason=None) -> str:
            response = ChatCompletionStreamResponse(
                id=request_id, created=created, model=self.response_model(request.model),
                choices=[ChatCompletionResponseStreamChoice(index=index, delta=delta, logprobs=logprobs,
                                                            finish_reason=finish_reason, stop_reason=stop_reason)],
            )
            if continuous_usage:
                response.usage = _usage(num_prompt_tokens, completion_tokens)
            return sse(_chunk_json(response))

        parsers = self._choice_outputs(request, prompt)
        for j in range(n):
            yield chunk(j, DeltaMessage(role=_ROLE, content=""))
            if echo:
                yield chunk(j, DeltaMessage(content=echo))
        finished: set[int] = set()
        generator = self.engine.stream(processed)
        try:
            async for _, output in merge_async_iterators([generator]):
                for o in output.outputs:
                    if o.index in finished:  # n > 1: a finished choice still rides along in later outputs
                        continue
                    if o.finish_reason is not None:
                        finished.add(o.index)
                    completion_tokens += len(o.token_ids)
                    want_logprobs = params.logprobs is not None and bool(o.token_ids)
                    if not o.text and o.finish_reason is None and not want_logprobs:
                        continue
                    parser = parsers[o.index]
                    delta = (parser.delta(o.text, list(o.token_ids)) if o.text else None) or DeltaMessage()
                    logprobs = self._logprobs(o.token_ids, o.logprobs or [], params.logprobs)
                    if o.finish_reason is not None:
                        rest = parser.finish()
                        if rest is not None:
                            yield chunk(o.index, delta, logprobs)
                            delta, logprobs = rest, None
                        finish_reason = parser.finish_reason(o.finish_reason)
                    else:
                        finish_reason = None
                        if _is_empty(delta) and not want_logprobs:
                            continue
                    yield chunk(o.index, delta, logprobs, finish_reason, o.stop_reason)
            if include_usage:
                final = ChatCompletionStreamResponse(id=request_id, created=created, model=self.response_model(request.model),
                                                     choices=[], usage=_usage(num_prompt_tokens, completion_tokens))
                yield sse(final.model_dump_json())
        except (RequestFailedError, EngineDeadError) as e:
            yield sse(from_engine_error(e).to_response().model_dump_json())
        yield SSE_DONE

    def _logprobs(self, token_ids: list[int], steps: list, num_top: Optional[int]) -> Optional[ChatCompletionLogProbs]:
        if num_top is None:
            return None
        content = []
        for token_id, step in zip(token_ids, steps):
            entry = step.get(token_id) if step else None
            if entry is None:
                continue
            token = token_text(self.tokenizer, token_id, step)
            top = [_logprob(token_text(self.tokenizer, t, step), lp.logprob) for t, lp in top_entries(step, num_top)]
            chosen = _logprob(token, entry.logprob)
            content.append(ChatCompletionLogProbsContent(**chosen.model_dump(), top_logprobs=top))
        return ChatCompletionLogProbs(content=content)


def _logprob(token: str, logprob: float) -> ChatCompletionLogProb:
    return ChatCompletionLogProb(token=token, logprob=max(logprob, _MIN_LOGPROB),
                                 bytes=list(token.encode("utf-8", errors="replace")))


def _is_empty(delta: DeltaMessage) -> bool:
    return delta.content is None and delta.reasoning_content is None and not delta.tool_calls


def _chunk_json(response: ChatCompletionStreamResponse) -> str:
    """A stream chunk as OpenAI writes it: a delta carries only the fields it sets."""
    data = response.model_dump(mode="json")
    for choice in data["choices"]:
        choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def _usage(prompt_tokens: int, completion_tokens: int) -> UsageInfo:
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)
