"""GPTQ, AWQ and compressed-tensors weights held in the GGUF CPU kernel's blocks of 32
(`layers/quantization/int4_blocks.py`, the "blocks" form, `PAGEDLLM_CPU_INT4_BLOCKS=1`).

The blocked weight must stand for the checkpoint's dequantized matrix bit for bit (act order
included: the inputs are permuted once at load and the activations per call); the kernel must equal
the PyTorch reference of the blocked form (`gguf_blocks.block_linear_reference`); layers whose groups
the blocks cannot hold keep the dequantized form; whole tiny checkpoints through the kernel give the
reference path's tokens, the dequantized float32 model's tokens (logprobs within 5e-3), and hold
about a fifth of the float32 bytes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from quant_checkpoints import write_quantized_checkpoint

from pagedllm import LLM, SamplingParams, cpu_ops
from pagedllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear
from pagedllm.model_executor.layers.quantization import CPU_INT4_BLOCKS_ENV, checkpoint_form
from pagedllm.model_executor.layers.quantization.awq import AWQConfig
from pagedllm.model_executor.layers.quantization.compressed_tensors import CompressedTensorsConfig
from pagedllm.model_executor.layers.quantization.gguf_blocks import block_linear_reference
from pagedllm.model_executor.layers.quantization.gptq import GPTQConfig

IN, OUT = 256, 96

CONFIGS = {
    "gptq-v1-asym-act-order": GPTQConfig(bits=4, group_size=32, desc_act=True, sym=False),
    "gptq-v2-sym-g64": GPTQConfig(bits=4, group_size=64, desc_act=False, sym=True, checkpoint_format="gptq_v2"),
    "gptq-per-channel": GPTQConfig(bits=4, group_size=-1, desc_act=False, sym=False),
    "gptq-int8": GPTQConfig(bits=8, group_size=128, desc_act=False, sym=False),
    "awq-g32": AWQConfig(bits=4, group_size=32),
    "compressed-tensors-sym-g128": CompressedTensorsConfig(bits=4, group_size=128, symmetric=True),
    "compressed-tensors-asym-actorder": CompressedTensorsConfig(bits=4, group_size=32, symmetric=False, actorder=True),
}


def random_layers(config, forms: tuple[str, ...], group_index: torch.Tensor | None = None,
                  seed: int = 0) -> dict[str, RowParallelLinear]:
    """One layer per form, loaded with the same random checkpoint tensors in the format's layout."""
    gen = torch.Generator().manual_seed(seed)
    tensors, layers = {}, {}
    for form in forms:
        layer = RowParallelLinear(IN, OUT, bias=True, linear_method=config.linear_method(form=form))
        for name, param in layer.named_parameters():
            if name not in tensors:
                if name in ("g_idx", "weight_g_idx"):  # act order: each group's inputs scattered along k
                    tensors[name] = (group_index if group_index is not None
                                     else torch.randperm(IN, generator=gen) // config.group_size).int()
                elif param.dtype == torch.int32:  # any word is 8 valid nibbles (4 bytes)
                    tensors[name] = torch.randint(-2**31, 2**31 - 1, param.shape, generator=gen).to(torch.int32)
                else:  # scales (float16-representable, as checkpoints store them) and the bias
                    tensors[name] = (torch.rand(param.shape, generator=gen) * 0.1 + 0.01).half().float()
            param.copy_(tensors[name])
        layer.linear_method.process_weights_after_loading(layer)
        layers[form] = layer
    return layers


@pytest.mark.parametrize("name", list(CONFIGS))
def test_blocks_stand_for_the_dequantized_matrix_and_the_kernel_for_its_reference(name):
    config = CONFIGS[name]
    layers = random_layers(config, ("packed", "blocks"))
    packed, blocks = layers["packed"], layers["blocks"]
    held = blocks.int_blocks
    bits = config.bits
    # the integers stay integers, `bits` a weight, with a float32 scale and min per block of 32
    assert not hasattr(blocks, "weight") and not hasattr(blocks, "qweight")
    assert held.weight.bits == bits and held.weight.qweight.dtype == torch.uint8
    assert tuple(held.weight.qweight.shape) == (OUT, IN * bits // 8)
    perm_bytes = IN * 8 if getattr(config, "desc_act", False) or getattr(config, "actorder", False) else 0
    assert blocks.linear_method.weight_bytes(blocks) == OUT * IN * bits // 8 + 2 * 4 * OUT * IN // 32 + perm_bytes
    assert (held.input_perm is not None) == (perm_bytes > 0)
    # ... standing for exactly the matrix the checkpoint means
    expected = packed.linear_method.dequantize(packed)
    assert torch.equal(held.dequantize(), expected)

    x = torch.randn(7, IN, generator=torch.Generator().manual_seed(1))
    x_in_block_order = x if held.input_perm is None else x[:, held.input_perm]
    reference = block_linear_reference(x_in_block_order, held.weight, act_bits=blocks.int_act_bits) + blocks.bias
    for rows in (1, 4, 7):  # the kernel runs activation rows 4 at a time, and the rest one by one
        torch.testing.assert_close(blocks(x[:rows]), reference[:rows], rtol=1e-4, atol=1e-4)
    # the 15-bit activations are the only difference from the float product: a few 1e-5 of its size
    # (q8 activations, PAGEDLLM_GGUF_ACT_BITS=8, are ~100x further off)
    exact = F.linear(x, expected, blocks.bias)
    assert (blocks(x) - exact).norm() / exact.norm() < 2e-4


def test_bfloat16_model_blocks_match_the_float32_ones():
    """A bfloat16 model's activations go to the same kernel (as GGUF layers do); the product
    comes back in bfloat16."""
    config = CONFIGS["awq-g32"]
    blocks = random_layers(config, ("blocks",))["blocks"]
    x = torch.randn(3, IN)
    y16 = blocks(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), blocks(x.bfloat16().float()), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("config, group_index, reason", [
    (GPTQConfig(bits=4, group_size=16, desc_act=False, sym=False), None, "not whole blocks of 32"),
    # act order whose groups are uneven counts of inputs (as on a tensor-parallel rank's share)
    (GPTQConfig(bits=4, group_size=32, desc_act=True, sym=False),
     torch.cat([torch.zeros(48), torch.full((IN - 48,), 7)]).long(), "not whole blocks of 32"),
], ids=["group-16", "uneven-act-order-groups"])
def test_groups_the_blocks_cannot_hold_stay_dequantized(config, group_index, reason, caplog):
    layers = random_layers(config, ("packed", "blocks"), group_index)
    blocks = layers["blocks"]
    assert not hasattr(blocks, "int_blocks") and blocks.weight.dtype == torch.float32
    assert blocks.linear_method.describe(blocks).endswith("dequantized at load")
    x = torch.randn(5, IN)
    torch.testing.assert_close(blocks(x), layers["packed"](x), rtol=1e-5, atol=1e-5)


def test_blocks_form_is_opt_in_on_cpu(monkeypatch):
    cpu, f32 = torch.device("cpu"), torch.float32
    monkeypatch.delenv(CPU_INT4_BLOCKS_ENV, raising=False)
    assert checkpoint_form(cpu, f32) == "dequantized"
    monkeypatch.setenv(CPU_INT4_BLOCKS_ENV, "1")
    assert checkpoint_form(cpu, f32) == "blocks" and checkpoint_form(cpu, torch.bfloat16) == "blocks"
    assert checkpoint_form(cpu, torch.float16) == "dequantized"  # the kernel takes float32 or bfloat16 activations
    assert checkpoint_form(torch.device("cuda"), f32) == "triton"


def test_fused_act_order_layer_shares_one_permutation(tmp_path, llama_dir):
    """q, k and v of a GPTQ act-order checkpoint read the same input, in one order: one blocked weight."""
    from safetensors.torch import load_file

    write_quantized_checkpoint(llama_dir, str(tmp_path / "q"), str(tmp_path / "ref"), "gptq", sym=False,
                               desc_act=True, group_size=32)
    quantized = load_file(str(tmp_path / "q/model.safetensors"))
    reference = load_file(str(tmp_path / "ref/model.safetensors"))
    prefix = "model.layers.1.self_attn."
    layer = QKVParallelLinear(64, 16, 4, 2, linear_method=GPTQConfig(4, 32, True, False).linear_method(form="blocks"))
    for p in "qkv":
        for name in ("qweight", "qzeros", "scales", "g_idx"):
            tensor = quantized[f"{prefix}{p}_proj.{name}"]
            layer.weight_loader(getattr(layer, name), tensor.float() if name == "scales" else tensor, p)
    layer.linear_method.process_weights_after_loading(layer)
    expected = torch.cat([reference[prefix + f"{p}_proj.weight"] for p in "qkv"])
    assert layer.int_blocks.input_perm is not None
    assert torch.equal(layer.int_blocks.dequantize(), expected)


# ----- whole checkpoints ------------------------------------------------------------------------------

PROMPTS = ["The capital of France is", "Hello, my name", "def add(a, b):"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=1)


def run(model: str, **kwargs) -> tuple[list, int]:
    """(the outputs, the weight bytes rank 0 holds)."""
    llm = LLM(model=model, max_model_len=128, num_gpu_blocks_override=32, **kwargs)
    try:
        outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        return outs, llm.llm_engine.engine_core.core.model_executor.collective_rpc("weight_bytes")[0]
    finally:
        llm.shutdown()


def chosen_logprobs(outs: list) -> list[list[float]]:
    return [[lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)] for o in outs]


@pytest.mark.parametrize("family, fmt, options", [
    ("llama", "gptq", dict(sym=False, desc_act=True)),
    ("qwen2", "awq", dict(sym=False)),
    ("llama", "compressed-tensors", dict(sym=True)),
], ids=["gptq-asym-act-order", "awq-qwen2", "compressed-tensors-sym"])
def test_checkpoint_in_blocks_gives_the_reference_paths_tokens(family, fmt, options, tmp_path, request, monkeypatch):
    """Through the kernel: the dequantized float32 model's tokens, logprobs within 5e-3 (the 15-bit
    activations move these tiny random models' logprobs by up to ~3e-3; q8 ones, PAGEDLLM_GGUF_ACT_BITS=8,
    moved them by 0.13-0.57, which is why the form is opt-in: the default dequantized form keeps 1e-3),
    and the PyTorch reference of the blocked form's; the weights a fifth of the float32 model's bytes."""
    if not cpu_ops.cpu_kernels_available():
        pytest.skip("the CPU kernels could not be built here")
    source = request.getfixturevalue(f"{family}_dir")
    quantized = str(tmp_path / "quantized")
    write_quantized_checkpoint(source, quantized, str(tmp_path / "reference"), fmt, group_size=32, **options)
    monkeypatch.delenv(CPU_INT4_BLOCKS_ENV, raising=False)
    dequantized, float_bytes = run(quantized)
    monkeypatch.setenv(CPU_INT4_BLOCKS_ENV, "1")
    kernel, block_bytes = run(quantized)
    assert [o.outputs[0].token_ids for o in kernel] == [o.outputs[0].token_ids for o in dequantized]
    np.testing.assert_allclose(sum(chosen_logprobs(kernel), []), sum(chosen_logprobs(dequantized), []), atol=5e-3)
    monkeypatch.setattr(cpu_ops, "cpu_kernels_available", lambda: False)
    reference, _ = run(quantized)
    assert [o.outputs[0].token_ids for o in kernel] == [o.outputs[0].token_ids for o in reference]
    # not to float rounding: the reference path also swaps the norms, rotary and attention kernels for
    # PyTorch ops, and where an activation lies on a q8 rounding boundary their last-bit differences
    # move it by a whole step (measured up to 0.026; the layers themselves agree to 1e-4, above)
    np.testing.assert_allclose(sum(chosen_logprobs(kernel), []), sum(chosen_logprobs(reference), []), atol=0.05)
    # the decoder layers' linears (float32: 4 bytes a weight) now take 0.75 bytes a weight
    linear_weights = 2 * (64 * 128 + 64 * 64 + 2 * 128 * 64 + 64 * 128)  # 2 layers: qkv, o, gate/up, down
    assert math.isclose(float_bytes - block_bytes, linear_weights * (4 - 0.75), rel_tol=0.05)


@pytest.mark.slow  # two worker processes
def test_tp2_blocks_equal_tp1_blocks(tmp_path, llama_dir, monkeypatch):
    """Each rank repacks its own shard (the inputs of a row-parallel layer split on whole groups)."""
    quantized = str(tmp_path / "quantized")
    write_quantized_checkpoint(llama_dir, quantized, str(tmp_path / "reference"), "gptq", sym=False, group_size=32)
    monkeypatch.setenv(CPU_INT4_BLOCKS_ENV, "1")
    one, _ = run(quantized)
    two, _ = run(quantized, tensor_parallel_size=2)
    assert [o.outputs[0].token_ids for o in one] == [o.outputs[0].token_ids for o in two]
    # the ranks' partial sums meet in another float order, and at 15 bits an activation near a rounding
    # step goes the other way more often than at 8 (measured up to 2.6e-4)
    np.testing.assert_allclose(sum(chosen_logprobs(one), []), sum(chosen_logprobs(two), []), rtol=1e-3, atol=1e-3)
