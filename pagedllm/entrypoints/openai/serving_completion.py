"""`POST /v1/completions`: one or many prompts (text or token ids), streamed or not.

Choice `i * n + j` is completion j of prompt i, as in OpenAI's and vLLM's servers. `echo` puts the
prompt (and, with `logprobs`, its logprobs) in front of the completion; `echo` with `max_tokens=0`
returns the prompt alone, which evaluation harnesses use to score text.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import AsyncGenerator, Optional, Union

from fastapi.responses import StreamingResponse

from pagedllm.engine.async_llm import EngineDeadError, RequestFailedError
from pagedllm.entrypoints.openai.constraints import structured_outputs_of
from pagedllm.entrypoints.openai.errors import OpenAIError, from_engine_error
from pagedllm.entrypoints.openai.limits import check_request_limits
from pagedllm.entrypoints.openai.protocol import (
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionResponseStreamChoice,
    CompletionStreamResponse,
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

_MIN_LOGPROB = -9999.0  # JSON has no -inf


@dataclass
class _Choice:
    """One completion, accumulated from its deltas."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None


class OpenAIServingCompletion(OpenAIServing):
    async def create_completion(self, request: CompletionRequest) -> Union[CompletionResponse, StreamingResponse]:
        lora_request = self.check_model(request.model)
        self.check_engine()
        if request.suffix is not None:
            raise OpenAIError("suffix is not supported", 400, param="suffix")
        if request.best_of is not None and request.best_of != request.n:
            raise OpenAIError("best_of is not supported unless it equals n", 400, param="best_of")
        echo_only = request.echo and request.max_tokens == 0
        constraint, _ = structured_outputs_of(request)
        check_request_limits(self.limits, request, num_prompts=_num_prompts(request.prompt))
        prompts = await self.off_the_event_loop(self._prompts, request)
        want_prompt_logprobs = request.prompt_logprobs
        if request.echo and request.logprobs is not None:
            want_prompt_logprobs = max(request.logprobs, request.prompt_logprobs or 0)
        explicit = "max_tokens" if "max_tokens" in request.model_fields_set and not echo_only else None
        params = self.sampling_params(request, 1 if echo_only else self.default_max_tokens(request.max_tokens),
                                      request.logprobs, want_prompt_logprobs)
        params.structured_outputs = constraint
        request_id = random_id("cmpl")
        processed = [self.process(f"{request_id}-{i}", prompt, params, explicit, lora_request=lora_request)
                     for i, prompt in enumerate(prompts)]
        if request.echo:  # checked: token-id prompts can be decoded now
            for prompt in prompts:
                if prompt.text is None:
                    prompt.text = self.tokenizer.decode(prompt.token_ids)
        if request.stream:
            return StreamingResponse(self._stream(request, request_id, prompts, processed, echo_only),
                                     media_type="text/event-stream")
        return await self._full(request, request_id, prompts, processed, echo_only)

    def _prompts(self, request: CompletionRequest) -> list[EnginePrompt]:
        prompt = request.prompt
        if isinstance(prompt, str):
            return [self.tokenize(prompt, request.add_special_tokens)]
        if not prompt:
            raise OpenAIError("prompt must not be empty", 400, param="prompt")
        if isinstance(prompt[0], int):
            return [EnginePrompt(None, list(prompt))]
        if isinstance(prompt[0], str):
            return [self.tokenize(p, request.add_special_tokens) for p in prompt]
        return [EnginePrompt(None, list(p)) for p in prompt]

    def _generators(self, processed: list[ProcessedRequest]) -> list:
        return [self.engine.stream(request) for request in processed]

    # ----- one JSON answer --------------------------------------------------------------
    async def _full(self, request: CompletionRequest, request_id: str, prompts: list[EnginePrompt],
                    processed: list[ProcessedRequest], echo_only: bool) -> CompletionResponse:
        n = request.n
        choices = [[_Choice() for _ in range(n)] for _ in prompts]
        prompt_logprobs: list[Optional[list]] = [None] * len(prompts)
        try:
            async for i, output in merge_async_iterators(self._generators(processed)):
                if output.prompt_logprobs is not None:
                    prompt_logprobs[i] = output.prompt_logprobs
                for o in output.outputs:
                    c = choices[i][o.index]
                    c.text += o.text
                    c.token_ids += o.token_ids
                    c.logprobs += o.logprobs or []
                    c.finish_reason, c.stop_reason = o.finish_reason, o.stop_reason
        except (RequestFailedError, EngineDeadError) as e:
            raise from_engine_error(e) from e
        out_choices = []
        completion_tokens = 0
        for i, prompt in enumerate(prompts):
            for j, c in enumerate(choices[i]):
                if echo_only:
                    c.text, c.token_ids, c.logprobs, c.finish_reason = "", [], [], "length"
                completion_tokens += len(c.token_ids)
                text, token_ids, steps = c.text, c.token_ids, c.logprobs
                if request.echo:
                    text = (prompt.text or "") + text
                    token_ids = prompt.token_ids + token_ids
                    steps = (prompt_logprobs[i] or [None] * len(prompt.token_ids)) + steps
                shown_prompt_logprobs = None
                if request.prompt_logprobs is not None:
                    shown_prompt_logprobs = serialize_prompt_logprobs(prompt_logprobs[i])
                out_choices.append(CompletionResponseChoice(
                    index=i * n + j,
                    text=text,
                    logprobs=self._logprobs(token_ids, steps, request.logprobs, 0),
                    finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason,
                    prompt_logprobs=shown_prompt_logprobs,
                ))
        num_prompt_tokens = sum(len(p.token_ids) for p in prompts)
        return CompletionResponse(
            id=request_id, model=self.response_model(request.model), choices=out_choices,
            usage=UsageInfo(prompt_tokens=num_prompt_tokens, completion_tokens=completion_tokens,
                            total_tokens=num_prompt_tokens + completion_tokens),
        )

    # ----- Server-Sent Events -----------------------------------------------------------
    async def _stream(self, request: CompletionRequest, request_id: str, prompts: list[EnginePrompt],
                      processed: list[ProcessedRequest], echo_only: bool) -> AsyncGenerator[str, None]:
        n, created = request.n, int(time.time())
        options = request.stream_options
        include_usage = bool(options and options.include_usage)
        continuous_usage = include_usage and bool(options.continuous_usage_stats)
        num_prompt_tokens = sum(len(p.token_ids) for p in prompts)
        completion_tokens = 0
        echoed: set[int] = set()
        finished: set[int] = set()
        offsets: dict[int, int] = {}
        try:
            async for i, output in merge_async_iterators(self._generators(processed)):
                for o in output.outputs:
                    index = i * n + o.index
                    if index in finished:  # n > 1: a finished completion still rides along in later outputs
                        continue
                    if o.finish_reason is not None:
                        finished.add(index)
                    text, token_ids, steps = o.text, o.token_ids, o.logprobs or []
                    if echo_only:
                        text, token_ids, steps = "", [], []
                    completion_tokens += len(token_ids)
                    if request.echo and index not in echoed:
                        echoed.add(index)
                        prompt = prompts[i]
                        text = (prompt.text or "") + text
                        token_ids = prompt.token_ids + token_ids
                        steps = (output.prompt_logprobs or [None] * len(prompt.token_ids)) + steps
                    finish_reason = "length" if echo_only and o.finish_reason else o.finish_reason
                    if not text and finish_reason is None and not (request.logprobs is not None and token_ids):
                        continue
                    logprobs = self._logprobs(token_ids, steps, request.logprobs, offsets.get(index, 0))
                    if logprobs is not None and logprobs.tokens:
                        offsets[index] = logprobs.text_offset[-1] + len(logprobs.tokens[-1])
                    chunk = CompletionStreamResponse(
                        id=request_id, created=created, model=self.response_model(request.model),
                        choices=[CompletionResponseStreamChoice(
                            index=index, text=text, logprobs=logprobs, finish_reason=finish_reason,
                            stop_reason=None if echo_only else o.stop_reason,
                        )],
                    )
                    if continuous_usage:
                        chunk.usage = _usage(num_prompt_tokens, completion_tokens)
                    yield sse(chunk.model_dump_json())
            if include_usage:
                final = CompletionStreamResponse(id=request_id, created=created, model=self.response_model(request.model), choices=[],
                                                 usage=_usage(num_prompt_tokens, completion_tokens))
                yield sse(final.model_dump_json())
        except (RequestFailedError, EngineDeadError) as e:
            yield sse(from_engine_error(e).to_response().model_dump_json())
        yield SSE_DONE

    def _logprobs(self, token_ids: list[int], steps: list, num_top: Optional[int],
                  start_offset: int) -> Optional[CompletionLogProbs]:
        """The legacy completions logprobs: per token its text, logprob, offset, and the top candidates."""
        if num_top is None:
            return None
        out = CompletionLogProbs()
        offset = start_offset
        for token_id, step in zip(token_ids, steps):
            token = token_text(self.tokenizer, token_id, step)
            out.tokens.append(token)
            out.text_offset.append(offset)
            offset += len(token)
            entry = step.get(token_id) if step else None
            if entry is None:
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                continue
            out.token_logprobs.append(max(entry.logprob, _MIN_LOGPROB))
            # The chosen token is always shown, as OpenAI does; where two tokens decode to the same
            # text (partial UTF-8), the more likely one keeps the entry.
            top = {token: max(entry.logprob, _MIN_LOGPROB)}
            for t, lp in top_entries(step, num_top):
                top.setdefault(token_text(self.tokenizer, t, step), max(lp.logprob, _MIN_LOGPROB))
            out.top_logprobs.append(top)
        return out


def _num_prompts(prompt: Union[str, list]) -> int:
    """How many prompts a completions `prompt` holds: a string or a list of token ids is one."""
    if isinstance(prompt, str) or not prompt or isinstance(prompt[0], int):
        return 1
    return len(prompt)


def _usage(prompt_tokens: int, completion_tokens: int) -> UsageInfo:
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)

