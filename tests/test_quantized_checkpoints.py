"""Pre-quantized checkpoints (`quantization="gptq"`, `"awq"`, `"compressed-tensors"`,
`layers/quantization/{gptq,awq,compressed_tensors}.py`): unpacking against hand-computed words,
a layer's packed form against its dequantized matrix, and whole models written by
`tests/quant_checkpoints.py` from the formats' specifications against the same weights dequantized
and saved as a plain float32 checkpoint (through pagedllm, and through transformers)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from quant_checkpoints import AWQ_ORDER, pack_words, write_quantized_checkpoint

from pagedllm import LLM, SamplingParams
from pagedllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear
from pagedllm.model_executor.layers.quantization.awq import AWQ_PACK_ORDER, AWQConfig
from pagedllm.model_executor.layers.quantization.compressed_tensors import CompressedTensorsConfig
from pagedllm.model_executor.layers.quantization.gptq import GPTQConfig, GPTQLinearMethod
from pagedllm.model_executor.layers.quantization.packed_int import unpack_int32

PROMPTS = ["The capital of France is", "Hello, my name", "def add(a, b):"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=3)
ENGINE = dict(max_model_len=128, num_gpu_blocks_override=32)


def word(nibbles: list[int], bits: int = 4) -> int:
    """The int32 whose value i (bits [bits*i, bits*(i+1))) is nibbles[i], by hand."""
    total = sum(v << (bits * i) for i, v in enumerate(nibbles))
    return total - (1 << 32) if total >= 1 << 31 else total


def test_unpacking_reads_hand_computed_words():
    assert word([1, 2, 3, 4, 5, 6, 7, 8]) == 0x87654321 - (1 << 32)
    packed = torch.tensor([[word([1, 2, 3, 4, 5, 6, 7, 8])], [word([15, 0, 0, 0, 0, 0, 0, 9])]], dtype=torch.int32)
    # GPTQ order, packed along the row: element i of the pack is value i
    assert unpack_int32(packed, 4, dim=1).tolist() == [[1, 2, 3, 4, 5, 6, 7, 8], [15, 0, 0, 0, 0, 0, 0, 9]]
    # along dim 0: word [r, n] holds rows 8r..8r+7 of column n
    assert unpack_int32(packed.T, 4, dim=0)[:, 0].tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    # AWQ: value i is element AWQ_PACK_ORDER[i] = [0, 2, 4, 6, 1, 3, 5, 7][i], so the elements read
    # 1 (value 0), 5 (value 4), 2 (value 1), 6, 3, 7, 4, 8
    assert list(AWQ_PACK_ORDER) == AWQ_ORDER
    assert unpack_int32(packed[:1], 4, dim=1, order=AWQ_PACK_ORDER).tolist() == [[1, 5, 2, 6, 3, 7, 4, 8]]
    # 8-bit: four values to a word
    assert unpack_int32(torch.tensor([[word([1, 2, 3, 250], bits=8)]]), 8, dim=1).tolist() == [[1, 2, 3, 250]]
    # the test helper's packer writes the same words from the same specification
    assert pack_words(np.array([[1, 2, 3, 4, 5, 6, 7, 8]]), 4, axis=1).tolist() == [[packed[0, 0].item()]]
    assert pack_words(np.array([[1, 5, 2, 6, 3, 7, 4, 8]]), 4, axis=1, order=AWQ_ORDER).tolist() == [[
        packed[0, 0].item()]]


def test_gptq_layer_loads_fused_shards_and_applies_act_order(tmp_path, llama_dir):
    """A fused QKV layer fed GPTQ q/k/v tensors with act order: the packed form, dequantized per
    call, and the form dequantized at load both equal x W^T with the reference W (q, k, v stacked)."""
    from safetensors.torch import load_file

    write_quantized_checkpoint(llama_dir, str(tmp_path / "q"), str(tmp_path / "ref"), "gptq", sym=False,
                               desc_act=True)
    quantized, reference = load_file(str(tmp_path / "q/model.safetensors")), load_file(
        str(tmp_path / "ref/model.safetensors"))
    prefix = "model.layers.1.self_attn."
    g_idx = quantized[prefix + "q_proj.g_idx"]
    assert not torch.equal(g_idx, torch.arange(64, dtype=torch.int32) // 16)  # act order: scattered groups
    assert torch.equal(torch.bincount(g_idx.long()), torch.full((4,), 16))
    config = GPTQConfig(bits=4, group_size=16, desc_act=True, sym=False)
    x = torch.randn(5, 64)
    expected = torch.cat([reference[prefix + f"{p}_proj.weight"] for p in "qkv"])
    for form in ("packed", "dequantized", "triton"):
        layer = QKVParallelLinear(64, 16, 4, 2, linear_method=GPTQLinearMethod(config, form=form))
        for p in "qkv":
            for name in ("qweight", "qzeros", "scales", "g_idx"):
                layer.weight_loader(getattr(layer, name), quantized[f"{prefix}{p}_proj.{name}"].float()
                                    if name == "scales" else quantized[f"{prefix}{p}_proj.{name}"], p)
        layer.linear_method.process_weights_after_loading(layer)
        torch.testing.assert_close(layer(x), F.linear(x, expected), rtol=1e-5, atol=1e-5)
        packed_bytes = 64 // 8 * 128 * 4 + 4 * 128 // 8 * 4 + 4 * 128 * 4 + 64 * 4
        triton_bytes = 64 // 8 * 128 * 4 + 2 * 4 * 128 * 4 + 64 * 4  # zeros unpacked, in the model dtype
        assert layer.linear_method.weight_bytes(layer) == {"packed": packed_bytes, "dequantized": 128 * 64 * 4,
                                                           "triton": triton_bytes}[form]

    # a fused layer holds one g_idx: shards quantized with different permutations are refused
    layer = QKVParallelLinear(64, 16, 4, 2, linear_method=GPTQLinearMethod(config))
    layer.weight_loader(layer.g_idx, g_idx, "q")
    with pytest.raises(ValueError, match="differs from the one the other projections"):
        layer.weight_loader(layer.g_idx, g_idx.flip(0), "k")


def test_row_parallel_rank_holds_its_inputs_and_the_whole_act_order_table(tmp_path, llama_dir):
    """o_proj over two ranks: with act order each rank keeps every group's scales and its slice of
    g_idx; without, its own groups. Both ranks' partial products sum to the whole product."""
    from safetensors.torch import load_file

    from pagedllm.distributed.parallel_state import TensorParallelGroup

    for desc_act in (True, False):
        write_quantized_checkpoint(llama_dir, str(tmp_path / f"q{desc_act}"), str(tmp_path / f"r{desc_act}"), "gptq",
                                   sym=False, desc_act=desc_act)
        quantized = load_file(str(tmp_path / f"q{desc_act}/model.safetensors"))
        expected = load_file(str(tmp_path / f"r{desc_act}/model.safetensors"))["model.layers.0.self_attn.o_proj.weight"]
        config = GPTQConfig(bits=4, group_size=16, desc_act=desc_act, sym=False)
        x, total = torch.randn(3, 64), 0
        for rank in (0, 1):
            layer = RowParallelLinear(64, 64, tp_group=TensorParallelGroup(rank=rank, world_size=2),
                                      linear_method=GPTQLinearMethod(config))
            for name in ("qweight", "qzeros", "scales", "g_idx"):
                tensor = quantized[f"model.layers.0.self_attn.o_proj.{name}"]
                layer.weight_loader(getattr(layer, name), tensor.float() if name == "scales" else tensor)
            assert layer.scales.shape[0] == (4 if desc_act else 2)
            layer.linear_method.process_weights_after_loading(layer)
            # each rank's partial product (the all-reduce would sum them)
            total = total + layer.linear_method.apply(layer, x[:, rank * 32:(rank + 1) * 32])
        torch.testing.assert_close(total, F.linear(x, expected), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", [
    GPTQConfig(bits=4, group_size=32, desc_act=True, sym=False),
    GPTQConfig(bits=8, group_size=-1, desc_act=False, sym=True, checkpoint_format="gptq_v2"),
    AWQConfig(bits=4, group_size=32),
    CompressedTensorsConfig(bits=4, group_size=32, symmetric=False, actorder=True),
], ids=["gptq4-act-order", "gptq8-channel", "awq", "compressed-tensors-asym"])
def test_triton_kernel_equals_the_dequantized_matrix(config):
    """The GPU path (run here under TRITON_INTERPRET=1): every format brought to the kernel's layout,
    against the packed reference, on row counts that fill one tile, part of one, and several."""
    torch.manual_seed(0)
    in_size, out_size = 128, 96  # 96: a partial column tile
    layers, tensors = {}, {}
    for form in ("packed", "triton"):
        layer = RowParallelLinear(in_size, out_size, bias=True, linear_method=config.linear_method(form=form))
        for name, param in layer.named_parameters():
            if name not in tensors:  # random words, zeros and scales in the format's layout; a real group index
                if name in ("g_idx", "weight_g_idx"):
                    tensors[name] = (torch.randperm(in_size) // 32).int()
                elif param.dtype == torch.int32:
                    tensors[name] = torch.randint(-2**31, 2**31 - 1, param.shape, dtype=torch.int64).to(torch.int32)
                else:
                    tensors[name] = torch.rand(param.shape) * 0.1 + 0.01
            param.copy_(tensors[name])
        layer.linear_method.process_weights_after_loading(layer)
        layers[form] = layer
    assert not hasattr(layers["triton"], "weight")  # the integers stay packed
    for rows in (1, 5, 40):
        x = torch.randn(rows, in_size)
        torch.testing.assert_close(layers["triton"](x), layers["packed"](x), rtol=1e-4, atol=1e-4)


def generate(model: str, **kwargs) -> list:
    llm = LLM(model=model, **ENGINE, **kwargs)
    try:
        return llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    finally:
        llm.shutdown()


def assert_same_generation(expected: list, got: list, tol: float = 1e-3) -> None:
    for e, g in zip(expected, got):
        e, g = e.outputs[0], g.outputs[0]
        assert g.token_ids == e.token_ids
        for token, lp_e, lp_g in zip(e.token_ids, e.logprobs, g.logprobs):
            assert math.isclose(lp_g[token].logprob, lp_e[token].logprob, abs_tol=tol)


CASES = {
    "gptq-int4-sym": ("llama", "gptq", dict(sym=True)),
    "gptq-int4-asym-act-order": ("llama", "gptq", dict(sym=False, desc_act=True)),
    "gptq-int8-asym-v2": ("llama", "gptq", dict(bits=8, sym=False, checkpoint_format="gptq_v2")),
    "gptq-quantize_config.json": ("qwen2", "gptq", dict(sym=True, desc_act=True, config_in="quantize_config.json")),
    "awq": ("llama", "awq", dict(sym=False, group_size=32)),
    "awq-qwen2-quant_config.json": ("qwen2", "awq", dict(sym=False, config_in="quant_config.json")),
    "compressed-tensors-sym": ("llama", "compressed-tensors", dict(sym=True)),
    "compressed-tensors-asym-actorder": ("qwen2", "compressed-tensors", dict(sym=False, desc_act=True)),
}


_ORIGINAL: dict[str, list] = {}  # the unquantized checkpoints' generations, by folder


@pytest.mark.parametrize("case", list(CASES))
def test_checkpoint_matches_its_dequantized_float32_model(case, tmp_path, request):
    family, fmt, options = CASES[case]
    source = request.getfixturevalue(f"{family}_dir")
    quantized, reference = str(tmp_path / "quantized"), str(tmp_path / "reference")
    write_quantized_checkpoint(source, quantized, reference, fmt, **options)
    llm = LLM(model=quantized, **ENGINE)  # the format is found in the checkpoint
    try:
        assert llm.llm_engine.config.model_config.quantization == fmt
        got = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    finally:
        llm.shutdown()
    assert_same_generation(generate(reference), got)
    # ... and quantizing really changed the model: the original float weights give other logprobs
    if source not in _ORIGINAL:
        _ORIGINAL[source] = generate(source)
    original = _ORIGINAL[source]
    assert max(abs(o.outputs[0].cumulative_logprob - g.outputs[0].cumulative_logprob)
               for o, g in zip(original, got)) > 1e-2


def test_dequantized_reference_agrees_with_transformers(tmp_path, llama_dir):
    """The reference the formats are held to is itself what Hugging Face transformers computes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quantized, reference = str(tmp_path / "quantized"), str(tmp_path / "reference")
    write_quantized_checkpoint(llama_dir, quantized, reference, "gptq", sym=False, desc_act=True)
    ours = generate(quantized, quantization="gptq")
    tokenizer = AutoTokenizer.from_pretrained(reference)
    model = AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32).eval()
    for prompt, out in zip(PROMPTS, ours):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            hf = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
            logits = model(torch.tensor([ids[0].tolist() + hf])).logits[0, ids.shape[1] - 1:-1]
        assert out.outputs[0].token_ids == hf
        hf_logprobs = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(hf)[:, None])[:, 0]
        for token, lp, hf_lp in zip(hf, out.outputs[0].logprobs, hf_logprobs.tolist()):
            assert math.isclose(lp[token].logprob, hf_lp, abs_tol=1e-3)


def test_lora_on_a_gptq_checkpoint_equals_lora_on_its_dequantized_model(tmp_path, llama_dir):
    """LoRA wraps whatever method holds the base weight: the adapter's term adds to the GPTQ layer's."""
    from lora_utils import build_adapter

    from pagedllm.lora.request import LoRARequest

    quantized, reference = str(tmp_path / "quantized"), str(tmp_path / "reference")
    write_quantized_checkpoint(llama_dir, quantized, reference, "gptq", sym=False, desc_act=True)
    adapter = LoRARequest("all", 1, build_adapter(llama_dir, str(tmp_path / "adapter"), seed=1, r=8, alpha=16))
    results = []
    for model in (reference, quantized):
        llm = LLM(model=model, enable_lora=True, max_lora_rank=8, **ENGINE)
        try:
            results.append(llm.generate(PROMPTS, GREEDY, use_tqdm=False, lora_request=adapter))
        finally:
            llm.shutdown()
    assert_same_generation(*results)


@pytest.mark.slow  # two worker processes: ~16 s on one busy core
def test_tp2_equals_tp1_on_an_act_order_gptq_checkpoint(tmp_path, llama_dir):
    quantized = str(tmp_path / "quantized")
    write_quantized_checkpoint(llama_dir, quantized, str(tmp_path / "reference"), "gptq", sym=False, desc_act=True)
    assert_same_generation(generate(quantized), generate(quantized, tensor_parallel_size=2), tol=1e-4)


def _with_quantization_config(tmp_path, source: str, settings: dict, **config_overrides) -> str:
    folder = str(tmp_path / "bad")
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(source):
        if not os.path.exists(os.path.join(folder, name)):
            os.symlink(os.path.join(source, name), os.path.join(folder, name))
    with open(os.path.join(source, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = settings
    config.update(config_overrides)
    os.remove(os.path.join(folder, "config.json"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    return folder


@pytest.mark.parametrize("settings, message", [
    ({"quant_method": "gptq", "bits": 3, "group_size": 128, "desc_act": False, "sym": True},
     "GPTQ checkpoints with bits=3 are not supported"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "marlin"},
     "checkpoint_format 'marlin' is not supported"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemv"},
     "AWQ version 'gemv' is not supported"),
    ({"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"g": {
        "targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "channel"}}}},
     "format 'float-quantized' is not supported"),
    ({"quant_method": "fp8"}, "quant_method='fp8', which is not supported"),
])
def test_unsupported_quantization_configs_are_clear_errors(settings, message, tmp_path, llama_dir):
    with pytest.raises(ValueError, match=message):
        LLM(model=_with_quantization_config(tmp_path, llama_dir, settings), **ENGINE)


def test_format_names_must_match_the_checkpoint(tmp_path, llama_dir):
    with pytest.raises(ValueError, match="quantization='awq' loads a checkpoint saved in that format"):
        LLM(model=llama_dir, quantization="awq", **ENGINE)
    gptq = _with_quantization_config(tmp_path, llama_dir, {"quant_method": "gptq", "bits": 4, "group_size": 16})
    with pytest.raises(ValueError, match="is a gptq checkpoint; quantization='int8' cannot apply"):
        LLM(model=gptq, quantization="int8", **ENGINE)
    moe = _with_quantization_config(tmp_path / "moe", llama_dir, {"quant_method": "awq", "bits": 4, "group_size": 16},
                                    num_local_experts=4)
    with pytest.raises(ValueError, match="awq checkpoints of mixture-of-experts models are not supported"):
        LLM(model=moe, **ENGINE)


def test_configs_parse_what_the_tools_write():
    assert GPTQConfig.from_config({"bits": 4, "group_size": 128, "desc_act": True, "sym": False}) == GPTQConfig(
        4, 128, True, False, "gptq")
    assert AWQConfig.from_config({"w_bit": 4, "q_group_size": 64, "zero_point": True, "version": "GEMM"}) == \
        AWQConfig(4, 64, True, "gemm")
    with pytest.raises(ValueError, match="without zero points"):
        AWQConfig.from_config({"bits": 4, "group_size": 128, "zero_point": False})
    with pytest.raises(ValueError, match="leave decoder modules unquantized"):
        AWQConfig.from_config({"bits": 4, "group_size": 128, "modules_to_not_convert": ["mlp.gate"]})
    with pytest.raises(ValueError, match="activation quantization is not supported"):
        CompressedTensorsConfig.from_config({"format": "pack-quantized", "config_groups": {"g": {
            "targets": ["Linear"], "weights": {"num_bits": 4, "strategy": "group", "group_size": 128},
            "input_activations": {"num_bits": 8}}}})
