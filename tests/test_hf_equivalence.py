"""Greedy tokens and logprobs equal Hugging Face transformers' on the same weights (float32)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pagedllm import LLM, SamplingParams

PROMPTS = [
    "The capital of France is",
    "Hello, my name is",
    "Continuous batching lets new requests join while others are still decoding. Prefix caching",
    "a",
]
MAX_TOKENS = 24
TOP_K = 3


def hf_greedy(model_dir: str, prompt_ids: list[int], max_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    """HF's greedy continuation and the raw log-softmax at each generated position."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    input_ids = torch.tensor([prompt_ids])
    out = model.generate(
        input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_tokens, do_sample=False,
        output_logits=True, return_dict_in_generate=True,
    )
    tokens = out.sequences[0, len(prompt_ids):].tolist()
    return tokens, [torch.log_softmax(l[0].float(), dim=-1) for l in out.logits]


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_greedy_and_logprobs_match_transformers(family, request):
    model_dir = request.getfixturevalue(f"{family}_dir")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    llm = LLM(model=model_dir, max_model_len=256)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=TOP_K)
    # Mixed lengths in one batch, plus a raw token-id prompt used verbatim.
    prompts = PROMPTS + [{"prompt_token_ids": [5, 17, 42, 99, 7, 250, 13]}]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    llm.shutdown()
    for prompt, output in zip(prompts, outputs):
        ids = prompt["prompt_token_ids"] if isinstance(prompt, dict) else tokenizer.encode(prompt)
        assert output.prompt_token_ids == ids
        expected, hf_logprobs = hf_greedy(model_dir, ids, MAX_TOKENS)
        completion = output.outputs[0]
        assert completion.token_ids == expected, f"{family}: {prompt!r}"
        assert len(completion.logprobs) == len(expected)
        total = 0.0
        for token, ours, ref in zip(expected, completion.logprobs, hf_logprobs):
            assert math.isclose(ours[token].logprob, ref[token].item(), abs_tol=1e-4)
            assert ours[token].rank == 1  # greedy picks the top token
            top_vals, top_ids = ref.topk(TOP_K)
            for v, t in zip(top_vals.tolist(), top_ids.tolist()):
                assert math.isclose(ours[t].logprob, v, abs_tol=1e-4)
            total += ours[token].logprob
        assert math.isclose(completion.cumulative_logprob, total, rel_tol=1e-6)


def test_prompt_logprobs_match_transformers(llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    prompt = "Prefix caching shares blocks between prompts with the same beginning."
    ids = tokenizer.encode(prompt)
    ref = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    # A small token budget makes the prompt arrive in chunks; logprobs must still be complete.
    llm = LLM(model=llama_dir, max_model_len=256, max_num_batched_tokens=8)
    for _ in range(2):  # the second run would be a prefix-cache hit
        out = llm.generate(prompt, SamplingParams(max_tokens=1, prompt_logprobs=2), use_tqdm=False)[0]
        assert out.prompt_logprobs[0] is None
        assert len(out.prompt_logprobs) == len(ids)
        for pos in range(1, len(ids)):
            entry = out.prompt_logprobs[pos]
            assert ids[pos] in entry and 2 <= len(entry) <= 3
            assert math.isclose(entry[ids[pos]].logprob, ref[pos - 1, ids[pos]].item(), abs_tol=1e-4)
            assert entry[ids[pos]].rank == int((ref[pos - 1] > ref[pos - 1, ids[pos]]).sum()) + 1
    llm.shutdown()
