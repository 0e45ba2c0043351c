"""`LLM`: vLLM's offline entry point. Give it prompts, get `RequestOutput`s back in input order."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Optional, Sequence, Union

from tqdm.auto import tqdm

from pagedllm.engine.arg_utils import EngineArgs
from pagedllm.engine.engine_state import EngineState
from pagedllm.engine.input_processor import PromptType
from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.engine.metrics import Metric
from pagedllm.logger import init_logger
from pagedllm.entrypoints.chat_utils import ChatContentError, flatten_content, image_placeholder
from pagedllm.entrypoints.score_utils import ScoreInput, cross_encoder_prompt, score_pairs
from pagedllm.lora.request import LoRARequest
from pagedllm.outputs import (
    ClassificationRequestOutput,
    EmbeddingRequestOutput,
    PoolingRequestOutput,
    RequestOutput,
    ScoringOutput,
    ScoringRequestOutput,
)
from pagedllm.pooling_params import PoolingParams
from pagedllm.sampling_params import RequestOutputKind, SamplingParams

logger = init_logger(__name__)

ChatMessages = list[dict[str, Any]]


class LLM:
    """An engine for offline batched generation, with vLLM's constructor arguments.

    `model` is a local Hugging Face checkpoint directory, a `.gguf` file, or a known short
    name (None: the embedded default model). Every other keyword is an `EngineArgs` field
    (`engine/arg_utils.py`, the one list of engine arguments): `tensor_parallel_size=N` splits the
    model over N worker processes, `quantization="int8"` runs int8 linear layers, and so on. A vLLM
    argument pagedllm does not implement yet raises `NotImplementedError`; an unknown one `TypeError`.
    """

    def __init__(self, model: Optional[str] = None, **kwargs: Any) -> None:
        engine_args = EngineArgs.from_kwargs(model=model, **kwargs)
        if engine_args.data_parallel_size != 1:
            raise ValueError(
                f"data_parallel_size={engine_args.data_parallel_size}: offline LLM runs one engine; serve replicas "
                "with `pagedllm serve --data-parallel-size N`"
            )
        self.llm_engine = LLMEngine.from_engine_args(engine_args)
        self._counter = itertools.count()

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs) -> "LLM":
        return cls(**{f.name: getattr(engine_args, f.name) for f in dataclasses.fields(engine_args)})

    # ----- generation -----------------------------------------------------------------
    def generate(
        self,
        prompts: Union[PromptType, Sequence[PromptType]],
        sampling_params: Optional[Union[SamplingParams, Sequence[SamplingParams]]] = None,
        use_tqdm: bool = True,
        *,
        lora_request: Union[LoRARequest, Sequence[Optional[LoRARequest]], None] = None,
        priority: Any = None,
        tokenization_kwargs: Optional[dict[str, Any]] = None,
        mm_processor_kwargs: Optional[dict[str, Any]] = None,
    ) -> list[RequestOutput]:
        _refuse_unsupported(priority=priority, tokenization_kwargs=tokenization_kwargs,
                            mm_processor_kwargs=mm_processor_kwargs)
        prompt_list = _as_prompt_list(prompts)
        return self._run(prompt_list, sampling_params, use_tqdm, lora_request)

    def chat(
        self,
        messages: Union[ChatMessages, Sequence[ChatMessages]],
        sampling_params: Optional[Union[SamplingParams, Sequence[SamplingParams]]] = None,
        use_tqdm: bool = True,
        chat_template: Optional[str] = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        *,
        lora_request: Union[LoRARequest, Sequence[Optional[LoRARequest]], None] = None,
        tools: Optional[list[dict[str, Any]]] = None,
        chat_template_kwargs: Optional[dict[str, Any]] = None,
        mm_processor_kwargs: Optional[dict[str, Any]] = None,
    ) -> list[RequestOutput]:
        """Render each conversation with the chat template, then generate (no BOS added twice).

        `tools` and `chat_template_kwargs` go to the template, as in vLLM; no tool calls are parsed
        from the output yet."""
        _refuse_unsupported(mm_processor_kwargs=mm_processor_kwargs)
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tokenizer = self.get_tokenizer()
        if chat_template is None and not getattr(tokenizer, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template; pass chat_template=...")
        placeholder = image_placeholder(tokenizer, self.llm_engine.config.model_config.hf_config)
        prompts = []
        for conversation in conversations:
            conversation, images = _flatten_conversation(conversation, placeholder)
            try:
                text = tokenizer.apply_chat_template(
                    conversation, chat_template=chat_template, tokenize=False, tools=tools,
                    add_generation_prompt=add_generation_prompt and not continue_final_message,
                    continue_final_message=continue_final_message, **(chat_template_kwargs or {}),
                )
            except Exception as e:  # template errors come in many types (jinja, KeyError, ...)
                raise ValueError(f"could not render the chat template: {e}") from e
            ids = tokenizer.encode(text, add_special_tokens=False)
            prompt = {"prompt": text, "prompt_token_ids": ids}
            if images:
                prompt["multi_modal_data"] = {"image": images}
            prompts.append(prompt)
        return self._run(prompts, sampling_params, use_tqdm, lora_request)

    def _run(self, prompts: list[PromptType], sampling_params: Any, use_tqdm: bool,
             lora_request: Union[LoRARequest, Sequence[Optional[LoRARequest]], None] = None) -> list[RequestOutput]:
        if sampling_params is None:
            params_list = [self.get_default_sampling_params()] * len(prompts)
        elif isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(
                    f"got {len(params_list)} sampling params for {len(prompts)} prompts; the lengths must match"
                )
        checked = []
        for params in params_list:
            if not isinstance(params, SamplingParams):
                raise ValueError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
            params = params.clone()
            params.output_kind = RequestOutputKind.FINAL_ONLY  # offline: only final outputs
            checked.append(params)
        return self._run_requests(prompts, checked, use_tqdm, lora_request)

    def _run_requests(self, prompts: list[PromptType], params_list: list[Union[SamplingParams, PoolingParams]],
                      use_tqdm: bool,
                      lora_request: Union[LoRARequest, Sequence[Optional[LoRARequest]], None] = None) -> list[Any]:
        if self.llm_engine.config.model_config.runner_type == "pooling" and any(
                isinstance(p, SamplingParams) for p in params_list):
            raise ValueError("LLM.generate() and LLM.chat() need a generative model; this one is a pooling model "
                             "(runner='pooling'): use embed, classify, score or encode")
        if isinstance(lora_request, (list, tuple)):
            lora_list = list(lora_request)
            if len(lora_list) != len(prompts):
                raise ValueError(f"got {len(lora_list)} lora requests for {len(prompts)} prompts; the lengths must match")
        else:
            lora_list = [lora_request] * len(prompts)
        engine = self.llm_engine
        request_ids: list[str] = []
        try:
            for prompt, params, lora in zip(prompts, params_list, lora_list):
                request_id = str(next(self._counter))
                engine.add_request(request_id, prompt, params, lora_request=lora)
                request_ids.append(request_id)
        except Exception:
            engine.abort_request(request_ids)  # one bad prompt fails the call, leaves the engine clean
            raise
        return self._run_engine(request_ids, use_tqdm)

    def _run_engine(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="Processed prompts", dynamic_ncols=True, disable=not use_tqdm)
        prompt_tokens = generated = 0
        try:
            while engine.has_unfinished_requests():
                for output in engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                        prompt_tokens += len(output.prompt_token_ids)
                        if isinstance(output, RequestOutput):
                            generated += sum(len(o.token_ids) for o in output.outputs)
                        bar.update(1)
                        elapsed = bar.format_dict["elapsed"] or 1e-9
                        bar.set_postfix_str(
                            f"est. speed input: {prompt_tokens / elapsed:.1f} toks/s, "
                            f"output: {generated / elapsed:.1f} toks/s",
                            refresh=False,
                        )
        except BaseException:
            engine.abort_request([r for r in request_ids if r not in finished])
            raise
        finally:
            bar.close()
        return [finished[r] for r in request_ids]

    # ----- pooling models ----------------------------------------------------------------
    def encode(
        self,
        prompts: Union[PromptType, Sequence[PromptType]],
        pooling_params: Optional[Union[PoolingParams, Sequence[PoolingParams]]] = None,
        use_tqdm: bool = True,
        *,
        pooling_task: Optional[str] = None,
        lora_request: Any = None,
    ) -> list[PoolingRequestOutput]:
        """Pool each prompt (a pooling model: `runner="pooling"`); the raw `PoolingRequestOutput`s, in order.
        `pooling_task` ("embed", "classify", "score", "encode") says which head applies; default "encode":
        the pooled hidden state, unnormalised (a classifier's raw logits)."""
        _refuse_unsupported(lora_request=lora_request)
        prompt_list = _as_prompt_list(prompts)
        if pooling_params is None or isinstance(pooling_params, PoolingParams):
            params_list = [pooling_params or PoolingParams()] * len(prompt_list)
        else:
            params_list = list(pooling_params)
            if len(params_list) != len(prompt_list):
                raise ValueError(f"got {len(params_list)} pooling params for {len(prompt_list)} prompts; the lengths "
                                 "must match")
        tasked = []
        for params in params_list:
            if not isinstance(params, PoolingParams):
                raise ValueError(f"pooling_params must be PoolingParams, got {type(params).__name__}")
            params = params.clone()
            params.task = pooling_task or params.task or "encode"
            tasked.append(params)
        return self._run_requests(prompt_list, tasked, use_tqdm)

    def embed(self, prompts: Union[PromptType, Sequence[PromptType]], *, use_tqdm: bool = True,
              pooling_params: Optional[Union[PoolingParams, Sequence[PoolingParams]]] = None,
              lora_request: Any = None) -> list[EmbeddingRequestOutput]:
        """One embedding per prompt (normalised unless `PoolingParams(normalize=False)`)."""
        outputs = self.encode(prompts, pooling_params, use_tqdm, pooling_task="embed", lora_request=lora_request)
        return [EmbeddingRequestOutput.from_base(o) for o in outputs]

    def classify(self, prompts: Union[PromptType, Sequence[PromptType]], *, use_tqdm: bool = True,
                 pooling_params: Optional[Union[PoolingParams, Sequence[PoolingParams]]] = None,
                 lora_request: Any = None) -> list[ClassificationRequestOutput]:
        """Each prompt's label probabilities (a classification model)."""
        outputs = self.encode(prompts, pooling_params, use_tqdm, pooling_task="classify", lora_request=lora_request)
        return [ClassificationRequestOutput.from_base(o) for o in outputs]

    def score(self, data_1: ScoreInput, data_2: ScoreInput, *, use_tqdm: bool = True,
              pooling_params: Optional[PoolingParams] = None, lora_request: Any = None) -> list[ScoringRequestOutput]:
        """The relevance of each document to its query: one query and N documents, or N and N.

        A cross-encoder (a classifier with one label) reads each pair as one two-segment prompt and
        scores it (sigmoid of its logit); an embedding model embeds both texts and scores their cosine
        similarity, as vLLM does."""
        _refuse_unsupported(lora_request=lora_request)
        pairs = score_pairs(data_1, data_2)
        params = pooling_params or PoolingParams()
        if not isinstance(params, PoolingParams):
            raise ValueError(f"pooling_params must be PoolingParams, got {type(params).__name__}")
        pooler = self.llm_engine.config.model_config.pooler_config
        if pooler is not None and pooler.task == "embed":
            texts = [t for pair in pairs for t in pair]
            vectors = self.embed(texts, use_tqdm=use_tqdm, pooling_params=params)
            out = []
            for i in range(len(pairs)):
                a, b = vectors[2 * i], vectors[2 * i + 1]
                cosine = _cosine(a.outputs.embedding, b.outputs.embedding)
                out.append(ScoringRequestOutput(f"score-{a.request_id}", ScoringOutput(cosine),
                                                a.prompt_token_ids + b.prompt_token_ids))
            return out
        tokenizer = self.get_tokenizer()
        prompts, params_list = [], []
        for query, document in pairs:
            prompt, boundary = cross_encoder_prompt(tokenizer, query, document)
            pair_params = params.clone()
            pair_params.task = "score"
            pair_params.extra_kwargs = {**pair_params.extra_kwargs, "compressed_token_type_ids": boundary}
            prompts.append(prompt)
            params_list.append(pair_params)
        outputs = self._run_requests(prompts, params_list, use_tqdm)
        scores = []
        for o in outputs:
            values = o.outputs.data.tolist()
            if len(values) != 1:
                raise ValueError(f"score needs a cross-encoder with one label; this classifier has {len(values)}")
            scores.append(ScoringRequestOutput(o.request_id, ScoringOutput(values[0]), o.prompt_token_ids))
        return scores

    # ----- the rest of vLLM's surface ---------------------------------------------------
    def get_tokenizer(self) -> Any:
        return self.llm_engine.get_tokenizer()

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams() with the model's generation_config.json defaults, as vLLM does."""
        return SamplingParams(**self.llm_engine.default_sampling_overrides)

    def get_metrics(self) -> list[Metric]:
        return self.llm_engine.get_metrics()

    def get_engine_state(self) -> EngineState:
        """What the KV cache and the scheduler hold now: the data behind the server's /dashboard."""
        return self.llm_engine.get_engine_state()

    def reset_prefix_cache(self) -> bool:
        return self.llm_engine.reset_prefix_cache()

    def shutdown(self) -> None:
        engine = getattr(self, "llm_engine", None)
        if engine is not None:
            engine.shutdown()

    def __del__(self) -> None:
        try:
            self.shutdown()
        except Exception:
            pass


def _flatten_conversation(conversation: list[dict], placeholder: Optional[str]) -> tuple[list[dict], list[Any]]:
    """The messages with string contents (image parts left as the image token), and their images."""
    messages, images = [], []
    for index, message in enumerate(conversation):
        try:
            text, found = flatten_content(message.get("content"), index, placeholder)
        except ChatContentError as e:
            raise ValueError(f"messages[{index}]: {e}") from None
        messages.append({**message, "content": text})
        images.extend(found)
    return messages, images


def _refuse_unsupported(**arguments: Any) -> None:
    """vLLM's per-call arguments for features pagedllm does not have yet: an error, never ignored."""
    features = {"priority": "priority scheduling",
                "tokenization_kwargs": "tokenization options (truncation, ...)",
                "mm_processor_kwargs": "image, audio and video inputs"}
    for name, value in arguments.items():
        if value is None or value == {} or (name == "priority" and not any(_as_list(value))):
            continue
        raise NotImplementedError(f"{name} is not supported by pagedllm yet ({features[name]})")


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    norm = (sum(x * x for x in a) * sum(y * y for y in b)) ** 0.5
    return dot / norm if norm else 0.0


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _as_prompt_list(prompts: Any) -> list[PromptType]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, (list, tuple)):
        if prompts and all(isinstance(t, int) for t in prompts):
            return [list(prompts)]  # one prompt given as token ids
        return list(prompts)
    raise ValueError(f"prompts must be a string, a prompt dict, or a list of them; got {type(prompts).__name__}")
