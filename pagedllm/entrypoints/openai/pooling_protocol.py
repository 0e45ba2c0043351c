"""Request and response bodies of the pooling routes, as pydantic models: OpenAI's `/v1/embeddings`,
and vLLM's `/pooling`, `/classify`, `/score` and `/rerank` (Jina's and Cohere's shape).

Inputs take every form OpenAI's embeddings API does: a string, a list of strings, a list of token
ids, or a list of token-id lists. vLLM's extras (`normalize`, `use_activation`, `add_special_tokens`)
are accepted; prompt truncation is not implemented (`truncate_prompt_tokens` is a 400 unless null).
"""

from __future__ import annotations

import time
import uuid
from typing import Literal, Optional, Union

from pydantic import Field

from pagedllm.entrypoints.openai.protocol import OpenAIBaseModel, OpenAIRequestModel, UsageInfo

PoolingInput = Union[str, list[str], list[int], list[list[int]]]


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _now() -> int:
    return int(time.time())


class PoolingRequestBase(OpenAIRequestModel):
    model: Optional[str] = None
    user: Optional[str] = None
    add_special_tokens: bool = True
    truncate_prompt_tokens: Optional[int] = None


class EmbeddingRequest(PoolingRequestBase):
    input: PoolingInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = None
    normalize: Optional[bool] = None
    use_activation: Optional[bool] = None  # vLLM's newer name for normalize on embeddings


class EmbeddingResponseData(OpenAIBaseModel):
    index: int
    object: Literal["embedding"] = "embedding"
    embedding: Union[list[float], str]


class EmbeddingResponse(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: _id("embd"))
    object: Literal["list"] = "list"
    created: int = Field(default_factory=_now)
    model: str
    data: list[EmbeddingResponseData]
    usage: UsageInfo


class PoolingRequest(EmbeddingRequest):
    """vLLM's /pooling: the raw pooled vector (unnormalised unless `normalize` is true)."""


class PoolingResponseData(OpenAIBaseModel):
    index: int
    object: Literal["pooling"] = "pooling"
    data: Union[list[float], str]


class PoolingResponse(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: _id("pool"))
    object: Literal["list"] = "list"
    created: int = Field(default_factory=_now)
    model: str
    data: list[PoolingResponseData]
    usage: UsageInfo


class ClassificationRequest(PoolingRequestBase):
    input: PoolingInput
    use_activation: Optional[bool] = None


class ClassificationData(OpenAIBaseModel):
    index: int
    label: Optional[str]
    probs: list[float]
    num_classes: int


class ClassificationResponse(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: _id("classify"))
    object: Literal["list"] = "list"
    created: int = Field(default_factory=_now)
    model: str
    data: list[ClassificationData]
    usage: UsageInfo


class ScoreRequest(PoolingRequestBase):
    """One query and N documents, or N and N (`text_1` / `text_2`, vLLM's names; `queries` / `documents`
    are accepted too)."""

    text_1: Optional[Union[str, list[str]]] = None
    text_2: Optional[Union[str, list[str]]] = None
    queries: Optional[Union[str, list[str]]] = None
    documents: Optional[Union[str, list[str]]] = None
    use_activation: Optional[bool] = None


class ScoreData(OpenAIBaseModel):
    index: int
    object: Literal["score"] = "score"
    score: float


class ScoreResponse(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: _id("score"))
    object: Literal["list"] = "list"
    created: int = Field(default_factory=_now)
    model: str
    data: list[ScoreData]
    usage: UsageInfo


class RerankRequest(PoolingRequestBase):
    query: str
    documents: list[str]
    top_n: Optional[int] = Field(default=None, ge=0)
    return_documents: bool = True
    use_activation: Optional[bool] = None


class RerankDocument(OpenAIBaseModel):
    text: str


class RerankResult(OpenAIBaseModel):
    index: int
    document: Optional[RerankDocument] = None
    relevance_score: float


class RerankUsage(OpenAIBaseModel):
    total_tokens: int


class RerankResponse(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: _id("rerank"))
    model: str
    usage: RerankUsage
    results: list[RerankResult]
