"""`POST /v1/chat/completions`: messages through the chat template, answers streamed or not.

A stream opens with one role delta per choice (`{"role": "assistant", "content": ""}`), then
content deltas, the finish reason on the last one, the usage chunk when
`stream_options.include_usage` asks for it, and `data: [DONE]`, exactly as OpenAI sends them.
"""

from __future__ import annotations

import json
import time
from typing import AsyncGenerator, Optional, Union

from fastapi.responses import StreamingResponse

from pagedllm.engine.async_llm import EngineDeadError, RequestFailedError
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
    ChatMessage,
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

_ROLE = "assistant"
_MIN_LOGPROB = -9999.0  # JSON has no -inf


class OpenAIServingChat(OpenAIServing):
    async def create_chat_completion(
        self, request: ChatCompletionRequest,
    ) -> Union[ChatCompletionResponse, StreamingResponse]:
        self.check_model(request.model)
        self.check_engine()
        self._check_unsupported(request)
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
        request_id = random_id("chatcmpl")
        processed = self.process(request_id, prompt, params, param if requested is not None else None,
                                 rename={"prompt": "messages", "logprobs": "top_logprobs"})
        echo = ""
        if request.echo and request.messages[-1].role == _ROLE:
            echo = self.render_content(request.messages[-1])
        if request.stream:
            return StreamingResponse(self._stream(request, prompt, processed, echo), media_type="text/event-stream")
        return await self._full(request, prompt, processed, echo)

    def _check_unsupported(self, request: ChatCompletionRequest) -> None:
        fmt = request.response_format
        if fmt is not None and fmt.get("type", "text") != "text":
            raise OpenAIError(f"response_format {fmt.get('type')!r} is not supported (only 'text')", 400,
                              param="response_format")
        if request.tool_choice not in (None, "none", "auto"):
            raise OpenAIError("only tool_choice 'none' or 'auto' is supported (tools go to the chat template)", 400,
                              param="tool_choice")
        if request.top_logprobs is not None and not request.logprobs:
            raise OpenAIError("top_logprobs needs logprobs to be true", 400, param="top_logprobs")

    def _render_and_tokenize(self, request: ChatCompletionRequest) -> EnginePrompt:
        text = self.render_chat(request.messages, request.add_generation_prompt, request.continue_final_message,
                                request.chat_template, request.chat_template_kwargs, request.tools)
        return self.tokenize(text, request.add_special_tokens)

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
        choices = [
            ChatCompletionResponseChoice(
                index=j, message=ChatMessage(role=_ROLE, content=texts[j]),
                logprobs=self._logprobs(token_ids[j], steps[j], params.logprobs),
                finish_reason=finish[j][0], stop_reason=finish[j][1],
            )
            for j in range(n)
        ]
        completion_tokens = sum(len(t) for t in token_ids)
        return ChatCompletionResponse(
            id=request_id, model=self.model_name, choices=choices,
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
                id=request_id, created=created, model=self.model_name,
                choices=[ChatCompletionResponseStreamChoice(index=index, delta=delta, logprobs=logprobs,
                                                            finish_reason=finish_reason, stop_reason=stop_reason)],
            )
            if continuous_usage:
                response.usage = _usage(num_prompt_tokens, completion_tokens)
            return sse(_chunk_json(response))

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
                    delta = DeltaMessage(content=o.text) if o.text else DeltaMessage()
                    logprobs = self._logprobs(o.token_ids, o.logprobs or [], params.logprobs)
                    yield chunk(o.index, delta, logprobs, o.finish_reason, o.stop_reason)
            if include_usage:
                final = ChatCompletionStreamResponse(id=request_id, created=created, model=self.model_name,
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


def _chunk_json(response: ChatCompletionStreamResponse) -> str:
    """A stream chunk as OpenAI writes it: a delta carries only the fields it sets."""
    data = response.model_dump(mode="json")
    for choice in data["choices"]:
        choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def _usage(prompt_tokens: int, completion_tokens: int) -> UsageInfo:
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)
