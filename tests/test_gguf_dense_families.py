"""Phi-3, Gemma 2 and Gemma 3 GGUF files (written here with gguf's GGUFWriter, as llama.cpp's converter
lays them out) run as transformers runs the same file: the same config, weights and greedy tokens.

llama.cpp stores Gemma's norms as (1 + weight), transformers' GGUF reader takes the 1 back off,
pagedllm folds it in again; Phi-3's Q/K/V and gate/up stay fused in the file.
"""

from __future__ import annotations

import math
from pathlib import Path

import gguf
from gguf_utils import add_decoder_header, add_tokenizer
import numpy as np
import pytest
import torch
from test_gguf_loader import CHAT_TEMPLATE, MERGED_TOKENS, SPECIAL_TOKENS, TOKENS
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from pagedllm import LLM, SamplingParams

WINDOW = 8  # well inside the prompt below


def tiny_model(arch: str) -> torch.nn.Module:
    common = dict(vocab_size=len(TOKENS), hidden_size=64, intermediate_size=128, max_position_embeddings=256,
                  rms_norm_eps=1e-6, num_attention_heads=4, num_key_value_heads=2, pad_token_id=None,
                  bos_token_id=TOKENS.index("<|im_start|>"), eos_token_id=TOKENS.index("<|im_end|>"))
    if arch == "phi3":
        config = AutoConfig.for_model("phi3", num_hidden_layers=2, tie_word_embeddings=False, **common)
    elif arch == "gemma2":
        config = AutoConfig.for_model("gemma2", num_hidden_layers=2, head_dim=16, sliding_window=WINDOW, **common)
    else:  # six layers: Gemma 3's pattern makes the last one global
        config = AutoConfig.for_model("gemma3_text", num_hidden_layers=6, head_dim=16, sliding_window=WINDOW,
                                      **common)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.2)
    return model


def write_gguf(path: Path, arch: str) -> None:
    model = tiny_model(arch)
    config = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    head_dim = add_decoder_header(writer, config, arch)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_value_length(head_dim)
    if arch != "phi3":
        writer.add_sliding_window(WINDOW)
    add_tokenizer(writer, config, TOKENS, SPECIAL_TOKENS, MERGED_TOKENS, CHAT_TEMPLATE)
    writer.add_pad_token_id(0)  # else transformers' Phi3Config assumes Phi-3's 32000, past this vocabulary
    name_map = gguf.get_tensor_name_map(next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch),
                                        config.num_hidden_layers)
    state_dict = model.state_dict()
    if config.tie_word_embeddings:
        del state_dict["lm_head.weight"]
    for hf_name, tensor in state_dict.items():
        data = tensor.numpy()
        if arch != "phi3" and hf_name.endswith("norm.weight"):
            data = data + 1.0  # llama.cpp's Gemma converter stores the scale itself
        writer.add_tensor(name_map.get_name(hf_name, try_suffixes=(".weight", ".bias")), np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def transformers_model(path: Path) -> torch.nn.Module:
    """transformers' model of the file (what `from_pretrained(gguf_file=...)` builds, without accelerate)."""
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=meta)["tensors"]
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model.load_state_dict(tensors, strict=False)
    model.tie_weights()
    model.generation_config.eos_token_id = None
    return model.eval()


@pytest.mark.parametrize("arch", ["phi3", "gemma2", "gemma3"])
def test_gguf_greedy_tokens_and_logprobs_match_transformers(arch, tmp_path):
    path = tmp_path / f"tiny-{arch}.gguf"
    write_gguf(path, arch)
    prompt = [(7 * i) % 250 + 3 for i in range(20)]  # past the window
    reference = transformers_model(path)
    input_ids = torch.tensor([prompt])
    out = reference.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=32,
                             do_sample=False, output_logits=True, return_dict_in_generate=True)
    expected = out.sequences[0, len(prompt):].tolist()
    llm = LLM(model=str(path), max_model_len=128, dtype="float32")
    try:
        got = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True,
                                                                        logprobs=1), use_tqdm=False)[0].outputs[0]
        assert llm.llm_engine.get_tokenizer().eos_token_id == TOKENS.index("<|im_end|>")
    finally:
        llm.shutdown()
    assert got.token_ids == expected
    for token, ours, logits in zip(expected, got.logprobs, out.logits):
        assert math.isclose(ours[token].logprob, torch.log_softmax(logits[0].float(), -1)[token].item(), abs_tol=1e-4)
