"""Scoring's two inputs, shared by `LLM.score` and the server's `/score` and `/rerank`: which pairs to
score, and how a cross-encoder sees a pair.

vLLM pairs its inputs one to many (one query, N documents) or one to one (N queries, N documents).
A cross-encoder reads a pair as one prompt of two segments, tokenized together by its tokenizer
(`[CLS] query [SEP] document [SEP]` for BERT), and tells them apart by token type; the index where
type 1 starts travels in the request's `PoolingParams` (vLLM's compressed token-type ids). An
embedding model scores a pair by the cosine similarity of the two embeddings.
"""

from __future__ import annotations

from typing import Any, Union

ScoreInput = Union[str, list[str]]


def score_pairs(data_1: ScoreInput, data_2: ScoreInput) -> list[tuple[str, str]]:
    """The (query, document) pairs to score, or a ValueError naming what is wrong."""
    first = [data_1] if isinstance(data_1, str) else list(data_1)
    second = [data_2] if isinstance(data_2, str) else list(data_2)
    for name, items in (("the first input (queries)", first), ("the second input (documents)", second)):
        if not items:
            raise ValueError(f"{name} is empty")
        if not all(isinstance(item, str) for item in items):
            raise ValueError(f"{name} must be a string or a list of strings")
    if len(first) == 1:
        first = first * len(second)
    if len(first) != len(second):
        raise ValueError(f"score pairs one query with N documents, or N queries with N documents; got {len(first)} "
                         f"queries and {len(second)} documents")
    return list(zip(first, second))


def cross_encoder_prompt(tokenizer: Any, query: str, document: str) -> tuple[dict, int]:
    """(prompt dict with the pair's token ids, index of the first token of the second segment)."""
    encoded = tokenizer(query, document, return_token_type_ids=True)
    ids, types = list(encoded["input_ids"]), list(encoded["token_type_ids"])
    boundary = types.index(1) if 1 in types else len(ids)
    return {"prompt_token_ids": ids}, boundary
