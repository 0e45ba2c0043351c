"""The pooling routes of a real `pagedllm serve` process, against the offline engine on the same tiny
checkpoints: /v1/embeddings with the official openai client (float and base64, batches, token ids,
dimensions), /pooling, /classify, /score and /rerank on a cross-encoder; vLLM's 501 for a route the
model cannot serve, and 400s for bad input."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import openai
import pytest

from pagedllm import LLM, PoolingParams

from conftest import build_bert_checkpoint
from test_server_harness import RemoteServer

TEXTS = ["Hello, my name is pagedllm.", "Paris", "Prefix caching shares blocks between prompts with the same beginning."]
ATOL = 1e-5


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> str:
    return build_bert_checkpoint(str(tmp_path_factory.mktemp("bert")), is_matryoshka=True)


@pytest.fixture(scope="module")
def offline(bert_dir):
    llm = LLM(bert_dir)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def server(bert_dir):
    server = RemoteServer(bert_dir, "--served-model-name", "tiny-bert")
    yield server
    server.stop()


def test_embeddings_with_the_openai_client_equal_offline(server, offline):
    client = server.client()
    expected = [o.outputs.embedding for o in offline.embed(TEXTS, use_tqdm=False)]
    for encoding_format in ("float", "base64"):
        response = client.embeddings.create(model="tiny-bert", input=TEXTS, encoding_format=encoding_format)
        assert [d.index for d in response.data] == [0, 1, 2]
        for data, want in zip(response.data, expected):
            got = data.embedding
            if encoding_format == "base64":  # asked for explicitly, the client hands the string back as it is
                got = np.frombuffer(base64.b64decode(got), dtype="<f4")
            np.testing.assert_allclose(got, want, atol=ATOL)
    # The client's default asks for base64 and decodes it itself: the wire format must be float32 LE.
    default = client.embeddings.create(model="tiny-bert", input=TEXTS[0])
    np.testing.assert_allclose(default.data[0].embedding, expected[0], atol=ATOL)
    tokens = sum(len(o.prompt_token_ids) for o in offline.embed(TEXTS, use_tqdm=False))
    assert response.usage.prompt_tokens == response.usage.total_tokens == tokens


def test_raw_base64_token_ids_and_dimensions(server, offline):
    ids = offline.get_tokenizer().encode(TEXTS[2])
    body = server.post("/v1/embeddings", {"input": [ids, ids[:3]], "encoding_format": "base64"}).json()
    vectors = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in body["data"]]
    want = offline.embed([{"prompt_token_ids": ids}, {"prompt_token_ids": ids[:3]}], use_tqdm=False)
    for v, w in zip(vectors, want):
        np.testing.assert_allclose(v, w.outputs.embedding, atol=ATOL)
    short = server.client().embeddings.create(model="tiny-bert", input=TEXTS[0], dimensions=16,
                                              encoding_format="float")
    (want,) = offline.embed(TEXTS[0], pooling_params=PoolingParams(dimensions=16), use_tqdm=False)
    assert len(short.data[0].embedding) == 16
    np.testing.assert_allclose(short.data[0].embedding, want.outputs.embedding, atol=ATOL)


def test_pooling_route_returns_the_raw_pooled_state(server, offline):
    body = server.post("/pooling", {"input": TEXTS[1]}).json()
    assert body["data"][0]["object"] == "pooling"
    (want,) = offline.encode(TEXTS[1], use_tqdm=False)
    np.testing.assert_allclose(body["data"][0]["data"], want.outputs.data.numpy(), atol=ATOL)


def test_embedding_model_scores_and_reranks_by_cosine(server, offline):
    scores = server.post("/score", {"text_1": TEXTS[0], "text_2": TEXTS}).json()["data"]
    want = [o.outputs.score for o in offline.score(TEXTS[0], TEXTS, use_tqdm=False)]
    np.testing.assert_allclose([s["score"] for s in scores], want, atol=ATOL)
    ranked = server.post("/v1/rerank", {"query": TEXTS[0], "documents": TEXTS, "top_n": 2}).json()["results"]
    assert [r["index"] for r in ranked] == list(np.argsort(want)[::-1][:2])
    assert ranked[0]["document"]["text"] == TEXTS[ranked[0]["index"]]


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/embeddings", {"input": []}, 400, "input"),
    ("/v1/embeddings", {"input": [[1, 2, 10**6]]}, 400, "input"),
    ("/v1/embeddings", {"input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
    ("/v1/embeddings", {"input": "x", "dimensions": 1000}, 400, "dimensions"),
    ("/v1/embeddings", {"input": [[5] * 200]}, 400, "input"),
    ("/v1/embeddings", {"input": "x", "model": "nope"}, 404, "model"),
    ("/v1/embeddings", {"input": "x", "truncate_prompt_tokens": 3}, 400, "truncate_prompt_tokens"),
    ("/score", {"text_1": ["a", "b"], "text_2": ["a", "b", "c"]}, 400, "text_2"),
    ("/v1/completions", {"prompt": "Hello", "max_tokens": 2}, 501, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}, 501, None),
    ("/classify", {"input": "Hello"}, 501, None),
])
def test_bad_requests(server, path, body, status, param):
    response = server.post(path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param
    if status == 501:
        assert error["message"].startswith("The model does not support")
    assert server.post("/v1/embeddings", {"input": "still fine"}).status_code == 200


def test_generation_model_refuses_the_pooling_routes(llama_dir):
    server = RemoteServer(llama_dir, "--max-model-len", "256")
    try:
        with pytest.raises(openai.APIStatusError) as e:
            server.client().embeddings.create(model=llama_dir, input="Hello")
        assert e.value.status_code == 501 and "Embeddings API" in e.value.message
        for path in ("/pooling", "/classify", "/score", "/rerank"):
            assert server.post(path, {"input": "x", "text_1": "a", "text_2": "b", "query": "q",
                                      "documents": ["d"]}).status_code == 501
        assert server.post("/v1/completions", {"prompt": "Hello", "max_tokens": 2}).status_code == 200
        paths = set(httpx.get(server.url("/openapi.json"), headers=server.headers).json()["paths"])
        assert "/v1/completions" in paths and not paths & {"/v1/embeddings", "/pooling", "/score", "/rerank"}
    finally:
        server.stop()


def test_cross_encoder_score_rerank_and_classify(tmp_path):
    model_dir = build_bert_checkpoint(str(tmp_path), "BertForSequenceClassification", num_labels=1)
    llm = LLM(model_dir)
    want = [o.outputs.score for o in llm.score("What is the capital?", TEXTS, use_tqdm=False)]
    classified = llm.classify(TEXTS[0], use_tqdm=False)[0].outputs.probs
    llm.shutdown()
    server = RemoteServer(model_dir, "--served-model-name", "reranker")
    try:
        scores = server.post("/score", {"model": "reranker", "text_1": "What is the capital?", "text_2": TEXTS}).json()
        np.testing.assert_allclose([d["score"] for d in scores["data"]], want, atol=ATOL)
        ranked = server.post("/rerank", {"query": "What is the capital?", "documents": TEXTS}).json()
        assert [r["index"] for r in ranked["results"]] == list(np.argsort(want)[::-1])
        np.testing.assert_allclose([r["relevance_score"] for r in ranked["results"]], sorted(want, reverse=True),
                                   atol=ATOL)
        assert ranked["usage"]["total_tokens"] > 0
        body = server.post("/classify", {"input": TEXTS[0]}).json()
        np.testing.assert_allclose(body["data"][0]["probs"], classified, atol=ATOL)
        assert server.post("/v1/embeddings", {"input": "x"}).status_code == 501
        paths = set(httpx.get(server.url("/openapi.json"), headers=server.headers).json()["paths"])
        assert {"/score", "/rerank", "/v1/rerank", "/classify"} <= paths
        assert not paths & {"/v1/embeddings", "/v1/completions", "/v1/chat/completions"}
    finally:
        server.stop()
