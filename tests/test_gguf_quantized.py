"""`quantization="gguf"`: GGUF blocks decoded against the gguf package, the C++ kernel against the
PyTorch reference (bit-exact on the integers), tiny GGUF models run by the kernels against the
reference path, and the real SmolLM2 Q4_1 file's memory."""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from test_gguf_loader import write_tiny_gguf

from pagedllm import LLM, SamplingParams, cpu_ops
from pagedllm.model_executor.layers.quantization import gguf_blocks
from pagedllm.model_executor.layers.quantization.gguf import GGUFLinearMethod, Segment, gguf_linear

T = gguf.GGMLQuantizationType
# the types the gguf package can write (K-quants it only reads: their blocks are made by hand below)
WRITABLE = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]


def kernels_or_skip() -> None:
    if not cpu_ops.cpu_kernels_available():
        pytest.skip("the CPU kernels could not be built here")


def random_k_blocks(type_name: str, rows: int, k: int, seed: int = 0) -> np.ndarray:
    """Random Q4_K/Q5_K super-blocks: random bytes with d and dmin set to sane float16 values."""
    rng = np.random.default_rng(seed)
    size = gguf.GGML_QUANT_SIZES[T[type_name]][1]
    raw = rng.integers(0, 256, size=(rows, k // 256, size), dtype=np.uint8)
    raw[..., 0:4] = rng.uniform(0.001, 0.01, size=(rows, k // 256, 2)).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


def quantized(type_name: str, rows: int, k: int, seed: int = 0) -> np.ndarray:
    if type_name in WRITABLE:
        w = np.random.default_rng(seed).standard_normal((rows, k)).astype(np.float32)
        return gguf.quantize(w, T[type_name])
    return random_k_blocks(type_name, rows, k, seed)


@pytest.mark.parametrize("type_name", gguf_blocks.KERNEL_TYPES)
def test_decoded_blocks_dequantize_as_the_gguf_package(type_name):
    k = 512 if type_name.endswith("_K") else 160  # 160: a last group of one block
    raw = quantized(type_name, 24, k)
    weight = gguf_blocks.decode(raw, type_name)
    assert weight.shape == (24, k) and weight.bits == (4 if type_name in ("Q4_0", "Q4_1", "Q4_K") else 8)
    expected = torch.from_numpy(gguf.dequantize(raw, T[type_name]).reshape(24, k))
    # the same numbers; Q4_0/Q5_0/Q8_0 round d * (q - 8) and d * q - 8d apart in the last bit
    torch.testing.assert_close(weight.dequantize(), expected, rtol=1e-6, atol=1e-6)
    # packing is lossless both ways
    assert torch.equal(gguf_blocks.pack(weight.unpacked(), weight.bits), weight.qweight)


def test_types_without_a_kernel_are_not_decoded():
    assert gguf_blocks.decode(np.zeros((2, 210), dtype=np.uint8), "Q6_K") is None


def activations_in_natural_order(qa: torch.Tensor, k: int) -> torch.Tensor:
    order = gguf_blocks._group_order(k, padded=True)
    out = torch.zeros(qa.shape[0], k, dtype=torch.int8)
    keep = order >= 0
    out[:, order[keep]] = qa[:, keep]
    assert qa[:, ~keep].eq(0).all()  # the padding of a last, shorter group is zeros
    return out


@pytest.mark.parametrize("k", [32, 160, 576])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_quantization_matches_the_reference_bit_for_bit(k, dtype):
    kernels_or_skip()
    torch.manual_seed(0)
    x = (torch.randn(5, k) * torch.linspace(0.01, 20, k)).to(dtype)
    x[1, :32] = 0  # a zero block: d = 0, q = 0
    qa, d, s = cpu_ops.quantize_q8_blocks(x)
    q_ref, d_ref, s_ref = gguf_blocks.quantize_activations(x)
    assert torch.equal(activations_in_natural_order(qa, k), q_ref)
    assert torch.equal(d, d_ref) and torch.equal(s, s_ref)
    assert d[1, 0].item() == 0 and q_ref[1, :32].eq(0).all()


@pytest.mark.parametrize("vectorised", [True, False], ids=["avx512-vnni", "portable"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k", [32, 96, 160, 576])
def test_kernel_integer_sums_are_exact(vectorised, bits, k):
    """With activation scales of 1 and weight scales that are small powers of two, every float step
    is exact, so the kernel's output must equal the reference's integer block sums exactly."""
    kernels_or_skip()
    if vectorised and not torch.ops.pagedllm_cpu.gguf_gemm_has_vnni512():
        pytest.skip("this CPU has no AVX-512 VNNI")
    g = torch.Generator().manual_seed(k + bits)
    n, m, nb = 37, 6, k // 32  # 6 rows: a block of 4 and 2 on their own
    q = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8, generator=g)
    # activations in [-15, 15] and integer scales keep every partial sum below 2^24, exact in float32
    qa_nat = torch.randint(-15, 16, (m, k), dtype=torch.int8, generator=g)
    scales = 2.0 ** torch.randint(0, 4, (n, nb), generator=g).float()
    weight = gguf_blocks.BlockQuantizedWeight(bits, gguf_blocks.pack(q, bits), scales, torch.zeros(n, nb))
    order = gguf_blocks._group_order(k, padded=True)
    qa = torch.zeros(m, order.numel(), dtype=torch.int8)
    qa[:, order >= 0] = qa_nat[:, order[order >= 0]]
    ones, zeros = torch.ones(m, nb), torch.zeros(m, nb)
    out = torch.empty(m, n)
    cpu_ops.gguf_gemm(out, (qa, ones, zeros), weight.qweight, weight.scales, weight.mins, None, bits, vectorised)
    sums = gguf_blocks.block_sums(qa_nat, q)  # [m, n, nb] int32
    expected = (sums.double() * scales.double()[None]).sum(-1).float()
    assert torch.equal(out, expected)


@pytest.mark.parametrize("type_name", gguf_blocks.KERNEL_TYPES)
@pytest.mark.parametrize("rows", [1, 7])
def test_kernel_matches_the_reference_path(type_name, rows):
    kernels_or_skip()
    k = 512 if type_name.endswith("_K") else 576
    weight = gguf_blocks.decode(quantized(type_name, 67, k, seed=1), type_name)
    torch.manual_seed(2)
    x = torch.randn(rows, k)
    bias = torch.randn(67)
    expected = gguf_blocks.block_linear_reference(x, weight) + bias
    for vectorised in (True, False):
        out = torch.empty(rows, 67)
        cpu_ops.gguf_gemm(out, cpu_ops.quantize_q8_blocks(x), weight.qweight, weight.scales, weight.mins, bias,
                          weight.bits, vectorised)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)
    # and q8 activations keep the product close to the float one (the scheme's own error)
    exact = x.double() @ weight.dequantize().double().T + bias.double()
    assert ((expected.double() - exact).abs().max() / exact.abs().max()).item() < 0.02


def test_mixed_segments_write_their_own_columns(monkeypatch):
    """A fused layer of a 4-bit, an 8-bit and a float part (as Q4_K_M's QKV with a Q6_K V)."""
    kernels_or_skip()
    torch.manual_seed(3)
    k = 256
    a = gguf_blocks.decode(quantized("Q4_1", 16, k), "Q4_1")
    b = gguf_blocks.decode(quantized("Q8_0", 8, k), "Q8_0")
    c = torch.randn(8, k)
    segments = [Segment(0, 16, a), Segment(16, 24, b), Segment(24, 32, c)]
    x, bias = torch.randn(3, k), torch.randn(32)
    out = gguf_linear(x, segments, 32, bias)
    expected = torch.cat([gguf_blocks.block_linear_reference(x, a), gguf_blocks.block_linear_reference(x, b),
                          x @ c.T], dim=1) + bias
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)
    monkeypatch.setattr(cpu_ops, "cpu_kernels_available", lambda: False)
    torch.testing.assert_close(gguf_linear(x, segments, 32, bias), expected, rtol=1e-5, atol=1e-4)


# ----- whole models ---------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=[("llama", True, "Q4_0"), ("llama", False, "Q8_0"), ("qwen2", True, "Q4_1"),
                                        ("qwen3", False, "Q5_1")],
                ids=["llama-tied-Q4_0", "llama-untied-Q8_0", "qwen2-tied-Q4_1", "qwen3-untied-Q5_1"])
def tiny_quantized_gguf(request, tmp_path_factory) -> Path:
    arch, tie, type_name = request.param
    path = tmp_path_factory.mktemp(f"gguf-{arch}-{type_name}") / f"tiny-{arch}.gguf"
    write_tiny_gguf(path, arch, tie, quant_type=T[type_name])
    return path


PROMPTS = [[3, 70, 101, 200, 17], [260, 5, 9, 44, 88, 120, 31, 7, 250]]


def greedy(path: Path, quantization: str | None, max_tokens: int = 12, dtype: str = "float32"):
    llm = LLM(model=str(path), quantization=quantization, max_model_len=128, kv_cache_memory_bytes=8 << 20,
              dtype=dtype)
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                            SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=1),
                            use_tqdm=False)
        runner = llm.llm_engine.engine_core.core.model_executor.model_runner
        methods = {type(m.linear_method) for m in runner.model.modules() if hasattr(m, "linear_method")}
        return [list(o.outputs[0].token_ids) for o in outs], outs, methods
    finally:
        llm.shutdown()


def test_tiny_models_kernels_give_the_reference_paths_tokens(tiny_quantized_gguf, monkeypatch):
    kernels_or_skip()
    tokens, outs, methods = greedy(tiny_quantized_gguf, "gguf")
    assert methods == {GGUFLinearMethod}  # every linear layer and the LM head held in blocks
    monkeypatch.setattr(cpu_ops, "cpu_kernels_available", lambda: False)
    ref_tokens, ref_outs, _ = greedy(tiny_quantized_gguf, "gguf")
    assert tokens == ref_tokens
    for a, b in zip(outs, ref_outs):  # the chosen tokens' logprobs agree to float rounding
        lp = [next(iter(d.values())).logprob for d in a.outputs[0].logprobs]
        ref = [next(iter(d.values())).logprob for d in b.outputs[0].logprobs]
        np.testing.assert_allclose(lp, ref, rtol=1e-4, atol=1e-4)


def test_bfloat16_model_kernels_give_the_reference_paths_tokens(tmp_path, monkeypatch):
    """Between the matmuls the model runs in bfloat16; the blocks and their products are the same."""
    kernels_or_skip()
    path = tmp_path / "tiny-llama.gguf"
    write_tiny_gguf(path, "llama", True, quant_type=T.Q4_1)
    tokens, _, _ = greedy(path, "gguf", dtype="bfloat16")
    monkeypatch.setattr(cpu_ops, "cpu_kernels_available", lambda: False)
    assert greedy(path, "gguf", dtype="bfloat16")[0] == tokens


def test_decode_steps_in_one_op_equal_the_layer_by_layer_path(tiny_quantized_gguf, monkeypatch):
    """A decode-only step of a plain Llama-family GGUF model runs every layer in one C++ op
    (`models/gguf_decode_step.py`): the same kernels in the same order, so the same tokens and the
    same logprobs, bit for bit. Qwen2 (QKV bias) and Qwen3 (per-head norms) keep the layer loop."""
    kernels_or_skip()
    from pagedllm.model_executor.models.gguf_decode_step import GGUFDecodeStep

    calls = []
    original = GGUFDecodeStep.__call__
    monkeypatch.setattr(GGUFDecodeStep, "__call__", lambda self, *a: calls.append(1) or original(self, *a))
    _, outs, _ = greedy(tiny_quantized_gguf, "gguf")
    assert bool(calls) == ("llama" in tiny_quantized_gguf.name)
    monkeypatch.setattr(GGUFDecodeStep, "for_model", classmethod(lambda cls, layers, dtype: None))
    _, ref_outs, _ = greedy(tiny_quantized_gguf, "gguf")
    for a, b in zip(outs, ref_outs):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert [d for d in a.outputs[0].logprobs] == [d for d in b.outputs[0].logprobs]


def test_gguf_quantization_needs_a_gguf_file(llama_dir):
    with pytest.raises(ValueError, match="not a GGUF file"):
        LLM(model=llama_dir, quantization="gguf")


@pytest.mark.real_model
def test_smollm2_q4_1_stays_within_1_3x_its_file_size(smollm2_gguf):
    """Everything the model holds (blocks, norms, rotary tables) is at most 1.3x the file; the KV
    cache comes on top. A float32 load holds 5x."""
    llm = LLM(model=str(smollm2_gguf), quantization="gguf", max_model_len=256, kv_cache_memory_bytes=16 << 20)
    try:
        model = llm.llm_engine.engine_core.core.model_executor.model_runner.model
        held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
        held += sum(m.linear_method.weight_bytes(m) for m in model.modules() if hasattr(m, "gguf_segments"))
        assert held <= 1.3 * os.path.getsize(smollm2_gguf)
        out = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
        assert "Paris" in out[0].outputs[0].text
    finally:
        llm.shutdown()
