"""The pooling routes: OpenAI's `/v1/embeddings` and vLLM's `/pooling`, `/classify`, `/score` and
`/rerank`, over `AsyncLLM.encode`.

A request's inputs (one or a batch, text or token ids) become one pooling request each; every one is
checked by the engine's input processor before any is run (a 400 naming `input` otherwise), then they
run concurrently and the response lists them in input order. Which routes a server answers depends
on its model, as in vLLM: an embedding model serves embeddings, pooling and (cosine) scores; a
classifier serves classify, and scores and rerank when it is a one-label cross-encoder; a route the
model does not support, generation ones included on a pooling model, is vLLM's 501.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any, Optional

import numpy as np

from pagedllm.engine.async_llm import AsyncLLM
from pagedllm.entrypoints.openai.errors import OpenAIError, from_engine_error
from pagedllm.entrypoints.openai.pooling_protocol import (
    ClassificationData,
    ClassificationRequest,
    ClassificationResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingResponseData,
    PoolingInput,
    PoolingRequest,
    PoolingResponse,
    PoolingResponseData,
    RerankDocument,
    RerankRequest,
    RerankResponse,
    RerankResult,
    RerankUsage,
    ScoreData,
    ScoreRequest,
    ScoreResponse,
)
from pagedllm.entrypoints.openai.protocol import UsageInfo
from pagedllm.entrypoints.openai.serving_engine import OpenAIServing, random_id
from pagedllm.entrypoints.score_utils import cross_encoder_prompt, score_pairs
from pagedllm.outputs import PoolingRequestOutput
from pagedllm.pooling_params import PoolingParams


def not_supported(api: str) -> OpenAIError:
    """vLLM's answer to a route its model cannot serve."""
    return OpenAIError(f"The model does not support {api}", 501, type="NotImplementedError")


def supported_tasks(engine: AsyncLLM) -> set[str]:
    """What the served model can do: "generate", or its pooling tasks."""
    mc = engine.config.model_config
    if mc.runner_type != "pooling":
        return {"generate"}
    if mc.pooler_config.task == "embed":
        return {"embed", "encode", "score"}
    tasks = {"classify", "encode"}
    if getattr(mc.hf_config, "num_labels", 0) == 1:
        tasks.add("score")
    return tasks


class OpenAIServingPooling(OpenAIServing):
    def __init__(self, engine: AsyncLLM, served_model_names: list[str], **kwargs: Any) -> None:
        super().__init__(engine, served_model_names, **kwargs)
        self.tasks = supported_tasks(engine)
        self.model_config = engine.config.model_config

    def require(self, task: str, api: str) -> None:
        if task not in self.tasks:
            raise not_supported(api)

    # ----- routes --------------------------------------------------------------------
    async def create_embedding(self, request: EmbeddingRequest, raw: bool = False) -> Any:
        self.require("embed" if not raw else "encode", "Embeddings API" if not raw else "Pooling API")
        self._check_request(request)
        normalize = request.normalize if request.normalize is not None else request.use_activation
        params = PoolingParams(dimensions=request.dimensions, normalize=normalize, task="encode" if raw else "embed")
        outputs = await self._run(self._prompts(request.input, request.add_special_tokens), params)
        encoded = [_encode(o.outputs.data, request.encoding_format) for o in outputs]
        usage = _usage(outputs)
        if raw:
            return PoolingResponse(model=self.model_name, usage=usage,
                                   data=[PoolingResponseData(index=i, data=e) for i, e in enumerate(encoded)])
        return EmbeddingResponse(model=self.model_name, usage=usage,
                                 data=[EmbeddingResponseData(index=i, embedding=e) for i, e in enumerate(encoded)])

    async def create_pooling(self, request: PoolingRequest) -> PoolingResponse:
        return await self.create_embedding(request, raw=True)

    async def create_classify(self, request: ClassificationRequest) -> ClassificationResponse:
        self.require("classify", "Classification API")
        self._check_request(request)
        params = PoolingParams(use_activation=request.use_activation, task="classify")
        outputs = await self._run(self._prompts(request.input, request.add_special_tokens), params)
        labels = getattr(self.model_config.hf_config, "id2label", None) or {}
        data = []
        for i, o in enumerate(outputs):
            probs = o.outputs.data.tolist()
            best = int(np.argmax(probs))
            data.append(ClassificationData(index=i, label=labels.get(best), probs=probs, num_classes=len(probs)))
        return ClassificationResponse(model=self.model_name, data=data, usage=_usage(outputs))

    async def create_score(self, request: ScoreRequest) -> ScoreResponse:
        self.require("score", "Score API")
        self._check_request(request)
        first = request.text_1 if request.text_1 is not None else request.queries
        second = request.text_2 if request.text_2 is not None else request.documents
        if first is None or second is None:
            raise OpenAIError("give text_1 and text_2 (or queries and documents)", 400, param="text_1")
        scores, usage = await self._score(first, second, request.use_activation)
        return ScoreResponse(model=self.model_name, usage=usage,
                             data=[ScoreData(index=i, score=s) for i, s in enumerate(scores)])

    async def create_rerank(self, request: RerankRequest) -> RerankResponse:
        self.require("score", "Rerank (Score) API")
        self._check_request(request)
        if not request.documents:
            raise OpenAIError("documents must not be empty", 400, param="documents")
        scores, usage = await self._score(request.query, request.documents, request.use_activation)
        order = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)
        if request.top_n:
            order = order[: request.top_n]
        results = [RerankResult(index=i, relevance_score=scores[i],
                                document=RerankDocument(text=request.documents[i]) if request.return_documents else None)
                   for i in order]
        return RerankResponse(model=self.model_name, usage=RerankUsage(total_tokens=usage.total_tokens), results=results)

    # ----- the parts -----------------------------------------------------------------
    def _check_request(self, request: Any) -> None:
        if self.check_model(request.model) is not None:
            raise OpenAIError("LoRA adapters serve generation only, not pooling", 400, param="model")
        self.check_engine()
        if request.truncate_prompt_tokens is not None:
            raise OpenAIError("truncate_prompt_tokens is not supported by pagedllm yet (prompt truncation)", 400,
                              param="truncate_prompt_tokens")

    def _prompts(self, value: PoolingInput, add_special_tokens: bool) -> list[dict]:
        """OpenAI's input forms -> prompt dicts (text is tokenized by the input processor, or here
        without special tokens when the client asks)."""
        if isinstance(value, str):
            items: list[Any] = [value]
        elif value and all(isinstance(t, int) for t in value):
            items = [list(value)]
        else:
            items = list(value)
        if not items:
            raise OpenAIError("input must not be empty", 400, param="input")
        prompts = []
        for item in items:
            if isinstance(item, str):
                prompts.append({"prompt": item} if add_special_tokens else
                               {"prompt": item, "prompt_token_ids": self.tokenizer.encode(item, add_special_tokens=False)})
            else:
                prompts.append({"prompt_token_ids": list(item)})
        return prompts

    async def _run(self, prompts: list[dict], params: PoolingParams | list[PoolingParams],
                   param: str = "input") -> list[PoolingRequestOutput]:
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        base = random_id("pool")

        def process_all() -> list:
            return [self._check(lambda p=p, q=q, i=i: self.engine.process_pooling_request(f"{base}-{i}", p, q),
                                {"prompt": param})
                    for i, (p, q) in enumerate(zip(prompts, params_list))]

        processed = await self.off_the_event_loop(process_all)
        try:
            return list(await asyncio.gather(*(self.engine.encode(r) for r in processed)))
        except OpenAIError:
            raise
        except Exception as e:
            raise from_engine_error(e) from e

    async def _score(self, first: Any, second: Any, use_activation: Optional[bool]) -> tuple[list[float], UsageInfo]:
        try:
            pairs = score_pairs(first, second)
        except ValueError as e:
            raise OpenAIError(str(e), 400, param="text_2") from e
        if self.model_config.pooler_config.task == "embed":
            texts = [t for pair in pairs for t in pair]
            outputs = await self._run([{"prompt": t} for t in texts], PoolingParams(task="embed"), param="text_1")
            scores = [float(np.dot(outputs[2 * i].outputs.data.numpy(), outputs[2 * i + 1].outputs.data.numpy())
                            / max(float(np.linalg.norm(outputs[2 * i].outputs.data.numpy())
                                        * np.linalg.norm(outputs[2 * i + 1].outputs.data.numpy())), 1e-12))
                      for i in range(len(pairs))]
            return scores, _usage(outputs)
        prompts, params = [], []
        for query, document in pairs:
            prompt, boundary = cross_encoder_prompt(self.tokenizer, query, document)
            prompts.append(prompt)
            params.append(PoolingParams(use_activation=use_activation, task="score",
                                        extra_kwargs={"compressed_token_type_ids": boundary}))
        outputs = await self._run(prompts, params, param="text_1")
        return [float(o.outputs.data[0]) for o in outputs], _usage(outputs)


def _encode(vector: Any, encoding_format: str) -> list[float] | str:
    """OpenAI's two encodings: a list of floats, or base64 of the float32 little-endian bytes."""
    if encoding_format == "base64":
        return base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


def _usage(outputs: list[PoolingRequestOutput]) -> UsageInfo:
    tokens = sum(len(o.prompt_token_ids) for o in outputs)
    return UsageInfo(prompt_tokens=tokens, total_tokens=tokens)
