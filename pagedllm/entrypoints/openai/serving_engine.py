"""What completions and chat share: the model check, prompts to token ids, SamplingParams from a
request, the engine's checks as 400s, logprob entries, and merging several requests' streams into one.

Everything a client can get wrong is caught before the engine core sees the request: the request's
shape by pydantic (`protocol.py`), its sampling values by `SamplingParams`, and the rest (the
prompt's length and token ids, logprobs against `--max-logprobs`, `max_tokens` against the context)
by the engine's input processor (`AsyncLLM.process_request`), the same checks the offline API runs.
Each failure is a 400 naming the parameter, and nothing reaches the engine loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import uuid
from dataclasses import dataclass
from typing import Any, AsyncGenerator, AsyncIterator, Callable, Optional, TypeVar

from pagedllm.engine.async_llm import AsyncLLM
from pagedllm.engine.input_processor import InvalidRequestError, ProcessedRequest
from pagedllm.entrypoints.chat_utils import ChatContentError, flatten_content, image_placeholder
from pagedllm.entrypoints.openai.errors import OpenAIError, bad_request
from pagedllm.entrypoints.openai.limits import ServerLimits
from pagedllm.entrypoints.openai.protocol import ChatMessageParam, SamplingRequest
from pagedllm.entrypoints.openai.serving_models import OpenAIServingModels
from pagedllm.lora.request import LoRARequest
from pagedllm.outputs import Logprob
from pagedllm.sampling_params import SamplingParams

T = TypeVar("T")


@dataclass
class EnginePrompt:
    """A prompt ready for the engine: its text (when known) and its checked token ids."""

    text: Optional[str]
    token_ids: list[int]
    images: Optional[list] = None  # a chat's images (data or allowed URLs), in prompt order

    def as_engine_input(self) -> dict:
        prompt = {"prompt": self.text, "prompt_token_ids": self.token_ids}
        if self.images:
            prompt["multi_modal_data"] = {"image": self.images}
        return prompt


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class OpenAIServing:
    """`trust_request_chat_template`: render a `chat_template` sent with a request (vLLM's
    `--trust-request-chat-template`); without it such a request is a 400, since a template is code the
    server runs."""

    def __init__(self, engine: AsyncLLM, served_model_names: list[str], chat_template: Optional[str] = None,
                 limits: ServerLimits = ServerLimits(), trust_request_chat_template: bool = False,
                 models: Optional[OpenAIServingModels] = None) -> None:
        self.engine = engine
        self.served_model_names = served_model_names
        self.models = models or OpenAIServingModels(engine, served_model_names, "")
        self.chat_template = chat_template
        self.limits = limits
        self.trust_request_chat_template = trust_request_chat_template
        self.tokenizer = engine.get_tokenizer()
        self.image_placeholder = image_placeholder(self.tokenizer, engine.config.model_config.hf_config)
        self.max_model_len = engine.max_model_len

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    # ----- checks -------------------------------------------------------------------
    def check_model(self, model: Optional[str]) -> Optional[LoRARequest]:
        """The LoRA adapter `model` names (None: the base model); a model the server lacks is a 404."""
        return self.models.resolve(model)

    def response_model(self, model: Optional[str]) -> str:
        """The `model` a response names: the adapter asked for, else the base model's first name."""
        return model if self.models.is_lora(model) else self.model_name

    def check_engine(self) -> None:
        if self.engine.is_dead:
            raise OpenAIError("the engine is not running; the server cannot serve requests", 503, code="engine_dead")

    # ----- prompts ------------------------------------------------------------------
    @staticmethod
    async def off_the_event_loop(fn: Callable[..., T], *args: Any) -> T:
        """Run CPU-heavy work (templates, tokenizing) in a worker thread, so that the event loop keeps
        serving every other request (and /health) meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args))

    def tokenize(self, text: str, add_special_tokens: bool) -> EnginePrompt:
        return EnginePrompt(text, self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def from_token_ids(self, token_ids: list[int], param: str = "prompt") -> EnginePrompt:
        self._check(lambda: self.engine.input_processor.check_token_ids(token_ids, param))
        return EnginePrompt(None, list(token_ids))

    def process(self, request_id: str, prompt: EnginePrompt, params: SamplingParams, explicit_max_tokens: Optional[str],
                rename: Optional[dict[str, str]] = None, lora_request: Optional[LoRARequest] = None) -> ProcessedRequest:
        """The engine's checks of one prompt (`InputProcessor.process`), as 400s naming the parameter
        (`rename`: the engine's name for it -> this route's, e.g. chat's `messages` for `prompt`).
        `explicit_max_tokens` names the field the client set `max_tokens` through, if it did: asking
        for more than the context leaves is then an error, as OpenAI's server makes it."""
        def process() -> ProcessedRequest:
            return self.engine.process_request(request_id, prompt.as_engine_input(), params,
                                               max_tokens_param=explicit_max_tokens, lora_request=lora_request)

        return self._check(process, rename)

    def default_max_tokens(self, requested: Optional[int]) -> Optional[int]:
        """What the client asked for, else the model's generation-config default, else None (the
        whole context the prompt leaves)."""
        return requested if requested is not None else self.engine.default_sampling_overrides.get("max_tokens")

    @staticmethod
    def _check(run: Any, rename: Optional[dict[str, str]] = None) -> Any:
        try:
            return run()
        except InvalidRequestError as e:
            param = (rename or {}).get(e.param, e.param)
            raise OpenAIError(str(e), 400, param=param, code=e.code) from e
        except (ValueError, NotImplementedError) as e:
            raise bad_request(e) from e

    def render_chat(self, messages: list[ChatMessageParam], add_generation_prompt: bool,
                    continue_final_message: bool, chat_template: Optional[str],
                    chat_template_kwargs: Optional[dict[str, Any]], tools: Optional[list] = None) -> tuple[str, list]:
        """The rendered prompt text, and the images of the messages' image parts, in order."""
        if not messages:
            raise OpenAIError("messages must contain at least one message", 400, param="messages")
        if add_generation_prompt and continue_final_message:
            raise OpenAIError("add_generation_prompt and continue_final_message cannot both be true", 400,
                              param="continue_final_message")
        if continue_final_message and messages[-1].role != "assistant":
            raise OpenAIError("continue_final_message needs the last message to be the assistant's", 400,
                              param="continue_final_message")
        kwargs = dict(chat_template_kwargs or {})
        if (chat_template is not None or "chat_template" in kwargs) and not self.trust_request_chat_template:
            raise OpenAIError("a chat_template sent with the request is refused: the server was not started with "
                              "--trust-request-chat-template", 400, param="chat_template")
        template = chat_template or kwargs.get("chat_template") or self.chat_template
        if template is None and not getattr(self.tokenizer, "chat_template", None):
            raise OpenAIError("this model has no chat template; start the server with --chat-template", 400,
                              param="messages")
        conversation, images = [], []
        for i, m in enumerate(messages):
            message, found = _message_dict(m, i, self.image_placeholder)
            conversation.append(message)
            images.extend(found)
        for reserved in ("conversation", "tokenize", "chat_template", "add_generation_prompt"):
            kwargs.pop(reserved, None)
        try:
            text = self.tokenizer.apply_chat_template(
                conversation, chat_template=template, tokenize=False, tools=tools,
                add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message, **kwargs,
            )
        except Exception as e:  # jinja errors, template-raised exceptions, bad kwargs: all the client's input
            raise OpenAIError(f"could not apply the chat template: {e}", 400, param="messages") from e
        limit = max_rendered_chars(self.max_model_len)
        if len(text) > limit:
            raise OpenAIError(f"the rendered chat template is {len(text)} characters long, more than {limit} could "
                              f"ever fit in {self.max_model_len} tokens", 400, param="messages",
                              code="context_length_exceeded")
        return text, images

    # ----- sampling parameters --------------------------------------------------------
    def sampling_params(self, request: SamplingRequest, max_tokens: int, logprobs: Optional[int],
                        prompt_logprobs: Optional[int]) -> SamplingParams:
        """SamplingParams from a request: the client's values, else the model's defaults, else OpenAI's."""
        defaults = self.engine.default_sampling_overrides

        def pick(name: str, fallback: Any) -> Any:
            value = getattr(request, name)
            return value if value is not None else defaults.get(name, fallback)

        logit_bias = None
        if request.logit_bias:
            try:
                logit_bias = {int(k): v for k, v in request.logit_bias.items()}
            except ValueError as e:
                raise OpenAIError(f"logit_bias keys must be token ids, got {list(request.logit_bias)[:5]}", 400,
                                  param="logit_bias") from e
        try:
            params = SamplingParams(
                n=request.n,
                temperature=pick("temperature", 1.0),
                top_p=pick("top_p", 1.0),
                top_k=pick("top_k", 0),
                min_p=pick("min_p", 0.0),
                repetition_penalty=pick("repetition_penalty", 1.0),
                presence_penalty=request.presence_penalty or 0.0,
                frequency_penalty=request.frequency_penalty or 0.0,
                seed=request.seed,
                stop=request.stop,
                stop_token_ids=request.stop_token_ids,
                ignore_eos=request.ignore_eos,
                max_tokens=max_tokens,
                min_tokens=request.min_tokens,
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
                skip_special_tokens=request.skip_special_tokens,
                spaces_between_special_tokens=request.spaces_between_special_tokens,
                include_stop_str_in_output=request.include_stop_str_in_output,
                logit_bias=logit_bias,
                allowed_token_ids=request.allowed_token_ids,
            )
        except ValueError as e:
            raise bad_request(e) from e
        return params


def max_rendered_chars(max_model_len: int) -> int:
    """Text longer than this cannot tokenize into `max_model_len` tokens (no tokenizer averages 64
    characters a token), so it is refused before it is tokenized."""
    return 64 * max_model_len + 65536


def _message_dict(message: ChatMessageParam, i: int, placeholder: Optional[str]) -> tuple[dict[str, Any], list]:
    """One message as the chat template expects it (string content, image parts left as the image
    token), and its images."""
    try:
        content, images = flatten_content(message.content, i, placeholder)
    except ChatContentError as e:
        raise OpenAIError(str(e), 400, param=f"messages.{i}.content") from None
    out: dict[str, Any] = {"role": message.role, "content": content}
    for key in ("name", "tool_calls", "tool_call_id"):
        if getattr(message, key) is not None:
            out[key] = getattr(message, key)
    return out, images


# ----- logprobs -------------------------------------------------------------------------
def top_entries(step: dict[int, Logprob], num_top: int) -> list[tuple[int, Logprob]]:
    """The step's `num_top` most likely tokens, best first."""
    ranked = [(t, lp) for t, lp in step.items() if lp.rank is not None and lp.rank <= num_top]
    return sorted(ranked, key=lambda e: e[1].rank)[:num_top]


def token_text(tokenizer: Any, token_id: int, step: Optional[dict[int, Logprob]]) -> str:
    entry = step.get(token_id) if step else None
    if entry is not None and entry.decoded_token is not None:
        return entry.decoded_token
    return tokenizer.decode([token_id])


def serialize_prompt_logprobs(prompt_logprobs: Optional[list]) -> Optional[list]:
    """vLLM's `prompt_logprobs` field: per prompt position, token id -> {logprob, rank, decoded_token}."""
    if prompt_logprobs is None:
        return None
    return [None if step is None else {t: {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": lp.decoded_token}
                                       for t, lp in step.items()} for step in prompt_logprobs]


# ----- streams ----------------------------------------------------------------------------
async def merge_async_iterators(iterators: list[AsyncIterator[T]]) -> AsyncGenerator[tuple[int, T], None]:
    """Items of several async iterators as they come, tagged with their iterator's index.

    Leaving early (or being cancelled) closes every iterator, which aborts their requests.
    """
    if len(iterators) == 1:
        async with contextlib.aclosing(iterators[0]) as it:
            async for item in it:
                yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def drain(i: int, it: AsyncIterator[T]) -> None:
        try:
            async with contextlib.aclosing(it) as closing:
                async for item in closing:
                    queue.put_nowait((i, item))
        except Exception as e:
            queue.put_nowait((i, e))
        finally:
            queue.put_nowait((i, done))

    tasks = [asyncio.create_task(drain(i, it)) for i, it in enumerate(iterators)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def sse(payload: str) -> str:
    return f"data: {payload}\n\n"


SSE_DONE = "data: [DONE]\n\n"
