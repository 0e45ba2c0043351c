"""The frontend's way in: a prompt and its `SamplingParams` become checked `EngineCoreRequest`s.

Everything a caller can get wrong is checked here, once, for the offline API and the server alike:
the prompt's form, its token ids (in the vocabulary, room left for output), the sampling
parameters against the model (token ids in the vocabulary, logprobs within `max_logprobs`). Then
the model's end-of-sequence ids are attached, `max_tokens` is capped to the room the context
leaves, and a request with `n > 1` is fanned out into `n` sequences (`engine/parent_request.py`).
The engine core trusts what comes out and never checks it again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional, Union

from pagedllm.config import LoRAConfig, ModelConfig
from pagedllm.engine.parent_request import child_request_id, child_sampling_params
from pagedllm.engine.tokenizer import eos_token_ids, sampling_defaults
from pagedllm.logger import init_logger
from pagedllm.lora.peft_loader import load_peft_adapter
from pagedllm.lora.request import LoRARequest
from pagedllm.multimodal.inputs import MultiModalFeature
from pagedllm.multimodal.processing import MultiModalProcessor
from pagedllm.pooling_params import PoolingParams
from pagedllm.request import EngineCoreRequest
from pagedllm.sampling_params import SamplingParams
from pagedllm.structured_output.backend_xgrammar import validate as validate_structured_outputs

logger = init_logger(__name__)

PromptType = Union[str, list[int], dict]

# vLLM's prompt-dict keys for features this engine does not have yet: asking for one is an error,
# never a prompt run without it.
UNSUPPORTED_PROMPT_KEYS = {
    "mm_processor_kwargs": "image, audio and video inputs",
    "multi_modal_uuids": "image, audio and video inputs",
    "media_io_kwargs": "image, audio and video inputs",
    "prompt_embeds": "prompt embeddings",
    "cache_salt": "prefix-cache salts",
    "encoder_prompt": "encoder-decoder models",
    "decoder_prompt": "encoder-decoder models",
}
PROMPT_KEYS = ("prompt", "prompt_token_ids", "multi_modal_data")


class InvalidRequestError(ValueError):
    """Bad input, with the request field it concerns (`param`) and an OpenAI error code when one
    applies; the server turns it into a 400, the offline API raises it as the ValueError it is."""

    def __init__(self, message: str, param: Optional[str] = None, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass
class ProcessedRequest:
    """A user request after the checks: what the output processor tracks for it, and the sequences
    the engine core runs (n of them)."""

    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    params: Union[SamplingParams, PoolingParams]  # a private copy (end-of-sequence ids attached)
    core_requests: list[EngineCoreRequest]

    @property
    def child_ids(self) -> list[str]:
        return [r.request_id for r in self.core_requests]


class InputProcessor:
    def __init__(self, model_config: ModelConfig, tokenizer: Any, generation_config: dict,
                 lora_config: Optional[LoRAConfig] = None) -> None:
        self.model_config = model_config
        self.lora_config = lora_config
        # Adapters already checked (read and matched against the model), by id: each is read once here.
        self.checked_loras: dict[int, LoRARequest] = {}
        self.tokenizer = tokenizer
        self._mm_processor: Optional[MultiModalProcessor] = None  # made on the first image
        self.eos_token_ids = eos_token_ids(tokenizer, model_config.hf_config, generation_config)
        # The SamplingParams defaults the checkpoint's generation_config.json sets, as vLLM applies them
        # (`LLM.get_default_sampling_params`, the server's fields left unset).
        self.default_sampling_overrides = sampling_defaults(generation_config)
        if self.default_sampling_overrides:
            logger.info("Default sampling parameters from the model's generation config: %s",
                        self.default_sampling_overrides)

    # ----- the whole request ---------------------------------------------------------
    def process(self, request_id: str, prompt: PromptType, params: Optional[SamplingParams] = None,
                arrival_time: Optional[float] = None, max_tokens_param: Optional[str] = None,
                lora_request: Optional[LoRARequest] = None) -> ProcessedRequest:
        """Check and prepare one request. `max_tokens_param` names the field a caller set `max_tokens`
        through when asking for more than the context leaves is an error (the server's rule); without
        it such a request is capped at the context (the offline API's)."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        text, ids = self.process_prompt(prompt)
        mm_features = None
        if isinstance(prompt, dict) and prompt.get("multi_modal_data") is not None:
            ids, mm_features = self.process_multimodal(ids, prompt["multi_modal_data"])
        self.check_sampling_params(params)
        self.check_lora_request(lora_request)
        params = params.clone()
        params.all_stop_token_ids |= self.eos_token_ids  # masked under min_tokens even with ignore_eos
        max_model_len = self.model_config.max_model_len
        room = max_model_len - len(ids)
        max_tokens = room
        if params.max_tokens is not None:
            if params.max_tokens > room and max_tokens_param is not None:
                raise InvalidRequestError(
                    f"'{max_tokens_param}' is too large: {params.max_tokens}. This model's maximum context length "
                    f"is {max_model_len} tokens and your request has {len(ids)} input tokens ({params.max_tokens} > "
                    f"{max_model_len} - {len(ids)}).", param=max_tokens_param, code="context_length_exceeded")
            max_tokens = min(room, params.max_tokens)
        arrival_time = time.monotonic() if arrival_time is None else arrival_time
        core_requests = [
            EngineCoreRequest(child_request_id(request_id, i, params.n), ids, child_sampling_params(params, i),
                              max_tokens, arrival_time, lora_request=lora_request, mm_features=mm_features)
            for i in range(params.n)
        ]
        return ProcessedRequest(request_id, text, ids, params, core_requests)

    def process_pooling(self, request_id: str, prompt: PromptType, params: PoolingParams,
                        arrival_time: Optional[float] = None) -> ProcessedRequest:
        """Check and prepare one pooling request: the prompt (which may fill the whole context: nothing
        is generated after it), and the parameters against the model and its task."""
        if not isinstance(params, PoolingParams):
            raise ValueError(f"pooling params must be a PoolingParams, got {type(params).__name__}")
        mc = self.model_config
        if mc.runner_type != "pooling":
            raise InvalidRequestError("this model generates text; pooling requests (embeddings, classification, "
                                      "scores) need a pooling model (runner='pooling')", param="model")
        params = params.clone()
        task = params.task or mc.pooler_config.task
        params.task = task
        if task == "embed" and mc.pooler_config.task != "embed":
            raise InvalidRequestError("this model is a classifier (or cross-encoder); it does not make embeddings",
                                      param="model")
        if task in ("classify", "score") and mc.pooler_config.task != "classify":
            raise InvalidRequestError(f"this model makes embeddings; {task} needs a classification model",
                                      param="model")
        if params.dimensions is not None:
            self.check_dimensions(params.dimensions)
        if isinstance(prompt, dict) and prompt.get("multi_modal_data") is not None:
            raise InvalidRequestError("pooling requests take text only, not multi_modal_data", param="input")
        text, ids = self.process_prompt(prompt, allow_full_context=True)
        boundary = params.token_type_boundary
        if boundary is not None and not 0 < boundary <= len(ids):
            raise InvalidRequestError(f"the second segment must start inside the prompt, got {boundary}")
        arrival_time = time.monotonic() if arrival_time is None else arrival_time
        core = EngineCoreRequest(request_id, ids, SamplingParams(max_tokens=1, detokenize=False), 1, arrival_time,
                                 pooling_params=params)
        return ProcessedRequest(request_id, text, ids, params, [core])

    def check_dimensions(self, dimensions: int) -> None:
        """vLLM's rule: only a Matryoshka-trained model may be truncated, to a size it supports."""
        config = self.model_config.hf_config
        supported = getattr(config, "matryoshka_dimensions", None)
        if not (getattr(config, "is_matryoshka", False) or supported):
            raise InvalidRequestError(
                f"this model does not support matryoshka representation; changing output dimensions will lead to "
                f"poor results (dimensions={dimensions})", param="dimensions")
        if supported and dimensions not in supported:
            raise InvalidRequestError(f"dimensions must be one of {list(supported)}, got {dimensions}",
                                      param="dimensions")
        if dimensions > config.hidden_size:
            raise InvalidRequestError(f"dimensions must be at most {config.hidden_size}, got {dimensions}",
                                      param="dimensions")

    # ----- the parts -------------------------------------------------------------------
    def process_prompt(self, prompt: PromptType, allow_full_context: bool = False) -> tuple[Optional[str], list[int]]:
        """Normalise any accepted prompt form to (text or None, token ids), checking it."""
        if isinstance(prompt, dict):
            for key in prompt:
                if key in UNSUPPORTED_PROMPT_KEYS:
                    raise NotImplementedError(f"prompt key {key!r} ({UNSUPPORTED_PROMPT_KEYS[key]}) is not supported "
                                              "by pagedllm yet")
                if key not in PROMPT_KEYS:
                    raise ValueError(f"unknown prompt key {key!r}; a prompt dict takes {list(PROMPT_KEYS)}")
            if "prompt_token_ids" in prompt:
                text, ids = prompt.get("prompt"), prompt["prompt_token_ids"]
                if not isinstance(ids, (list, tuple)):
                    raise ValueError(f"prompt_token_ids must be a list of token ids, got {type(ids).__name__}")
                ids = list(ids)
            elif "prompt" in prompt:
                text, ids = prompt["prompt"], None
            else:
                raise ValueError(f"a prompt dict needs 'prompt' or 'prompt_token_ids', got keys {sorted(prompt)}")
        elif isinstance(prompt, str):
            text, ids = prompt, None
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            text, ids = None, list(prompt)
        else:
            raise ValueError(f"unsupported prompt type {type(prompt).__name__}")
        if ids is None:
            if not isinstance(text, str):
                raise ValueError(f"prompt must be a string, got {type(text).__name__}")
            ids = self.tokenizer.encode(text)  # with the tokenizer's default special tokens (BOS)
        self.check_prompt_token_ids(ids, allow_full_context=allow_full_context)
        return text, ids

    def process_multimodal(self, ids: list[int], data: Any) -> tuple[list[int], list[MultiModalFeature]]:
        """A prompt's images (`multi_modal_data={"image": image or [images]}`): each image token of the
        prompt expanded into its placeholder run, each image read and preprocessed. Checked like the
        prompt: a model without a vision encoder, an unknown modality, a bad image, too many images."""
        if not self.model_config.is_multimodal:
            raise InvalidRequestError("this model takes text only: multi_modal_data needs a vision-language model",
                                      param="multi_modal_data")
        if not isinstance(data, dict) or set(data) - {"image"}:
            raise InvalidRequestError("multi_modal_data takes {'image': an image or a list of images}; other "
                                      "modalities are not supported", param="multi_modal_data")
        images = data.get("image")
        images = [] if images is None else list(images) if isinstance(images, (list, tuple)) else [images]
        if self._mm_processor is None:
            mc = self.model_config
            self._mm_processor = MultiModalProcessor(mc.model, mc.hf_config, mc.limit_mm_per_prompt,
                                                     frozenset(mc.allowed_media_domains))
        try:
            ids, features = self._mm_processor.process(ids, images)
        except ValueError as e:
            raise InvalidRequestError(str(e), param="multi_modal_data") from None
        self.check_prompt_token_ids(ids)
        return ids, features

    def check_lora_request(self, lora_request: Optional[LoRARequest]) -> None:
        """LoRA on, and the adapter readable and made for this model (read once per adapter id); an id
        already seen must keep its name and folder."""
        if lora_request is None:
            return
        if not isinstance(lora_request, LoRARequest):
            raise ValueError(f"lora_request must be a LoRARequest, got {type(lora_request).__name__}")
        if self.lora_config is None:
            raise InvalidRequestError("a LoRA adapter was requested but LoRA is off; start the engine with "
                                      "enable_lora=True (--enable-lora)", param="lora_request")
        known = self.checked_loras.get(lora_request.lora_int_id)
        if known == lora_request:
            return
        if known is not None:
            raise InvalidRequestError(f"lora_int_id {lora_request.lora_int_id} is already adapter "
                                      f"{known.lora_name!r} ({known.lora_path}); give each adapter its own id",
                                      param="lora_request")
        try:
            load_peft_adapter(lora_request.lora_path, self.model_config.hf_config, self.lora_config.max_lora_rank)
        except ValueError as e:
            raise InvalidRequestError(str(e), param="lora_request") from None
        self.checked_loras[lora_request.lora_int_id] = lora_request

    def check_prompt_token_ids(self, ids: list[int], param: str = "prompt", allow_full_context: bool = False) -> None:
        """Not empty, every id in the vocabulary, and room left for at least one generated token (a pooling
        prompt, which generates nothing, may fill the context: `allow_full_context`)."""
        if not ids:
            raise InvalidRequestError("the prompt is empty (no tokens)", param=param)
        self.check_token_ids(ids, param)
        max_len = self.model_config.max_model_len
        if allow_full_context and len(ids) > max_len:
            raise InvalidRequestError(
                f"This model's maximum context length is {max_len} tokens. However, your request has {len(ids)} "
                "input tokens. Please reduce the length of the input.", param=param, code="context_length_exceeded")
        if not allow_full_context and len(ids) >= max_len:
            raise InvalidRequestError(
                f"This model's maximum context length is {max_len} tokens. However, your request has {len(ids)} "
                "input tokens, which leaves no room for output. Please reduce the length of the input.",
                param=param, code="context_length_exceeded")

    def check_token_ids(self, ids: list[int], param: str) -> None:
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"token ids out of vocabulary (size {vocab}): {bad[:5]}", param=param)

    def check_sampling_params(self, params: SamplingParams) -> None:
        """What `SamplingParams` cannot check alone: token ids against this vocabulary, and logprobs
        against `max_logprobs`."""
        params.verify_vocab(self.model_config.vocab_size)
        if params.structured_outputs is not None:
            try:
                validate_structured_outputs(params.structured_outputs)
            except ValueError as e:
                raise InvalidRequestError(str(e), param="structured_outputs") from None
        max_logprobs = self.model_config.max_logprobs
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and max_logprobs >= 0:
                asked = self.model_config.vocab_size if value == -1 else value
                if asked > max_logprobs:
                    raise InvalidRequestError(
                        f"{name} must be between 0 and max_logprobs ({max_logprobs}), got {value}; start the engine "
                        "with a larger max_logprobs (-1: no limit) to ask for more", param=name)
