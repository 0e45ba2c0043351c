"""Pooling models offline (`LLM.embed`, `classify`, `score`, `encode`) against transformers on the same
tiny random weights, in float32: BERT embeddings (CLS and mean pooling), a decoder's last-token
embedding (`convert="embed"`), a BERT cross-encoder and classifier; then what is refused."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer, BertForSequenceClassification, BertModel

from pagedllm import LLM, PoolingParams, SamplingParams
from pagedllm.model_executor.pooling_config import resolve_runner

from conftest import build_bert_checkpoint

SENTENCES = [
    "Hello, my name is pagedllm.",
    "Prefix caching shares blocks between prompts with the same beginning, and continuous batching lets new "
    "requests join while others are still decoding.",
    "Paris",
    "The capital of France is Paris. The capital of Germany is Berlin.",
]
ATOL = 1e-5


def _hf_hidden(model_dir: str, texts: list[str], cls=BertModel) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Each text's final hidden states from transformers, one text at a time (no padding)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = cls.from_pretrained(model_dir, dtype=torch.float32).eval()
    hidden, ids = [], []
    with torch.no_grad():
        for text in texts:
            enc = tokenizer(text, return_tensors="pt")
            hidden.append(model(**enc).last_hidden_state[0])
            ids.append(enc["input_ids"][0].tolist())
    return hidden, ids


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> str:
    return build_bert_checkpoint(str(tmp_path_factory.mktemp("bert")))


@pytest.fixture(scope="module")
def bert_llm(bert_dir):
    llm = LLM(bert_dir)
    yield llm
    llm.shutdown()


def test_bert_cls_embeddings_match_transformers(bert_dir, bert_llm):
    outputs = bert_llm.embed(SENTENCES, use_tqdm=False)
    hidden, ids = _hf_hidden(bert_dir, SENTENCES)
    for out, h, i in zip(outputs, hidden, ids):
        assert out.prompt_token_ids == i
        torch.testing.assert_close(torch.tensor(out.outputs.embedding), F.normalize(h[0], dim=-1), atol=ATOL, rtol=0)


def test_encode_returns_the_unnormalised_pooled_state(bert_dir, bert_llm):
    (out,) = bert_llm.encode(SENTENCES[0], use_tqdm=False)
    hidden, _ = _hf_hidden(bert_dir, SENTENCES[:1])
    torch.testing.assert_close(out.outputs.data, hidden[0][0], atol=ATOL, rtol=0)
    (raw,) = bert_llm.embed(SENTENCES[0], pooling_params=PoolingParams(normalize=False), use_tqdm=False)
    torch.testing.assert_close(torch.tensor(raw.outputs.embedding), hidden[0][0], atol=ATOL, rtol=0)


def test_mean_pooling_read_from_the_sentence_transformers_config(tmp_path):
    model_dir = build_bert_checkpoint(str(tmp_path), seed=1)
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 64, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True}))
    llm = LLM(model_dir)
    assert llm.llm_engine.config.model_config.pooler_config.pooling_type == "MEAN"
    outputs = llm.embed(SENTENCES, use_tqdm=False)
    hidden, _ = _hf_hidden(model_dir, SENTENCES)
    for out, h in zip(outputs, hidden):
        torch.testing.assert_close(torch.tensor(out.outputs.embedding), F.normalize(h.mean(0), dim=-1),
                                   atol=ATOL, rtol=0)
    llm.shutdown()


def test_decoder_last_token_embedding_matches_transformers(llama_dir):
    llm = LLM(llama_dir, runner="pooling", convert="embed")
    assert llm.llm_engine.config.model_config.pooler_config.pooling_type == "LAST"
    outputs = llm.embed(SENTENCES, use_tqdm=False)
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    model = AutoModel.from_pretrained(llama_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for out, text in zip(outputs, SENTENCES):
            enc = tokenizer(text, return_tensors="pt")
            expected = F.normalize(model(**enc).last_hidden_state[0, -1], dim=-1)
            assert out.prompt_token_ids == enc["input_ids"][0].tolist()
            torch.testing.assert_close(torch.tensor(out.outputs.embedding), expected, atol=ATOL, rtol=0)
    llm.shutdown()


def test_cross_encoder_scores_match_transformers(tmp_path):
    model_dir = build_bert_checkpoint(str(tmp_path), "BertForSequenceClassification", num_labels=1)
    llm = LLM(model_dir)
    query, documents = "What is the capital of France?", SENTENCES
    scores = llm.score(query, documents, use_tqdm=False)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = BertForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for out, document in zip(scores, documents):
            enc = tokenizer(query, document, return_tensors="pt", return_token_type_ids=True)
            assert enc["token_type_ids"].sum() > 0  # the pair really has two segments
            expected = torch.sigmoid(model(**enc).logits[0, 0]).item()
            assert out.prompt_token_ids == enc["input_ids"][0].tolist()
            assert abs(out.outputs.score - expected) <= ATOL
    pairs = llm.score([query, "Berlin?"], [documents[0], documents[3]], use_tqdm=False)
    assert abs(pairs[0].outputs.score - scores[0].outputs.score) <= ATOL
    with pytest.raises(ValueError, match="N queries with N documents"):
        llm.score([query, query], documents, use_tqdm=False)
    with pytest.raises(ValueError, match="does not make embeddings"):
        llm.embed("x", use_tqdm=False)
    llm.shutdown()


def test_classifier_probabilities_match_transformers(tmp_path):
    model_dir = build_bert_checkpoint(str(tmp_path), "BertForSequenceClassification", num_labels=3)
    llm = LLM(model_dir)
    outputs = llm.classify(SENTENCES, use_tqdm=False)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = BertForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for out, text in zip(outputs, SENTENCES):
            expected = torch.softmax(model(**tokenizer(text, return_tensors="pt")).logits[0], dim=-1)
            assert out.outputs.num_classes == 3
            torch.testing.assert_close(torch.tensor(out.outputs.probs), expected, atol=ATOL, rtol=0)
    llm.shutdown()


def test_embedding_model_scores_by_cosine_similarity(bert_llm):
    scores = bert_llm.score(SENTENCES[0], SENTENCES[1:], use_tqdm=False)
    vectors = [torch.tensor(o.outputs.embedding) for o in bert_llm.embed(SENTENCES, use_tqdm=False)]
    for out, v in zip(scores, vectors[1:]):
        assert abs(out.outputs.score - F.cosine_similarity(vectors[0], v, dim=0).item()) <= 1e-5


def test_matryoshka_dimensions(tmp_path):
    model_dir = build_bert_checkpoint(str(tmp_path), is_matryoshka=True)
    llm = LLM(model_dir)
    (full,) = llm.embed(SENTENCES[1], pooling_params=PoolingParams(normalize=False), use_tqdm=False)
    (short,) = llm.embed(SENTENCES[1], pooling_params=PoolingParams(dimensions=16), use_tqdm=False)
    assert short.outputs.hidden_size == 16
    torch.testing.assert_close(torch.tensor(short.outputs.embedding),
                               F.normalize(torch.tensor(full.outputs.embedding[:16]), dim=-1), atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="at most 64"):
        llm.embed("x", pooling_params=PoolingParams(dimensions=65), use_tqdm=False)
    llm.shutdown()


def test_more_prompts_than_one_step_holds_run_whole_and_free_every_block(bert_dir):
    """A budget of one max-length prompt per step: pooling prompts wait for room instead of being
    chunked, every one comes back equal to its result alone, and no block stays in use."""
    llm = LLM(bert_dir, max_model_len=64, max_num_batched_tokens=64, max_num_seqs=3)
    prompts = SENTENCES * 5
    batched = llm.embed(prompts, use_tqdm=False)
    for prompt, out in zip(prompts, batched):
        (alone,) = llm.embed(prompt, use_tqdm=False)
        torch.testing.assert_close(torch.tensor(out.outputs.embedding), torch.tensor(alone.outputs.embedding),
                                   atol=ATOL, rtol=0)
    core = llm.llm_engine.engine_core.core
    core.check_idle_invariant()
    assert core.stats().requests_finished == 2 * len(prompts)
    llm.shutdown()


def test_bad_requests_are_value_errors(bert_dir, bert_llm, llm):
    with pytest.raises(ValueError, match="pooling model"):
        bert_llm.generate("Hello", SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(ValueError, match="matryoshka"):
        bert_llm.embed("Hello", pooling_params=PoolingParams(dimensions=8), use_tqdm=False)
    with pytest.raises(ValueError, match="maximum context length"):
        bert_llm.embed({"prompt_token_ids": [5] * 129}, use_tqdm=False)
    with pytest.raises(ValueError, match="classification model"):
        bert_llm.classify("Hello", use_tqdm=False)
    with pytest.raises(ValueError, match="generates text"):
        llm.embed("Hello", use_tqdm=False)  # the shared tiny Llama, a generator
    with pytest.raises(ValueError, match="dimensions must be a positive integer"):
        PoolingParams(dimensions=0)
    # a prompt that fills the whole context is fine: nothing is generated after it
    (full,) = bert_llm.embed({"prompt_token_ids": [5] * 128}, use_tqdm=False)
    assert len(full.prompt_token_ids) == 128
    assert not bert_llm.llm_engine.has_unfinished_requests()


def test_runner_resolution(bert_dir, llama_dir):
    from pagedllm.engine.arg_utils import load_hf_config

    bert, llama = load_hf_config(bert_dir), load_hf_config(llama_dir)
    assert resolve_runner(bert, bert_dir).runner_type == "pooling"
    assert resolve_runner(llama, llama_dir).runner_type == "generate"
    assert resolve_runner(llama, llama_dir, task="embed").pooler_config.pooling_type == "LAST"
    assert resolve_runner(llama, llama_dir, runner="pooling").pooler_config.task == "embed"
    with pytest.raises(ValueError, match="cannot generate"):
        resolve_runner(bert, bert_dir, runner="generate")
    with pytest.raises(ValueError, match="needs runner='pooling'"):
        resolve_runner(llama, llama_dir, runner="generate", convert="embed")
    with pytest.raises(NotImplementedError, match="convert='classify'"):
        resolve_runner(llama, llama_dir, convert="classify")
