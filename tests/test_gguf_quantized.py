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
from gguf_utils import quantize_q6_k
from test_gguf_loader import _transformers_gguf_tensors, write_tiny_gguf

from pagedllm import LLM, SamplingParams, cpu_ops
from pagedllm.model_executor.layers.quantization import gguf_blocks
from pagedllm.model_executor.layers.quantization import gguf as gguf_method
from pagedllm.model_executor.layers.quantization.gguf import GGUFLinearMethod, Segment, gguf_linear

T = gguf.GGMLQuantizationType
# the types the gguf package can write (K-quants it only reads: their blocks are made by hand below)
WRITABLE = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]


def kernels_or_skip() -> None:
    if not cpu_ops.cpu_kernels_available():
        pytest.skip("the CPU kernels could not be built here")


def random_k_blocks(type_name: str, rows: int, k: int, seed: int = 0) -> np.ndarray:
    """Random K-quant super-blocks: random bytes with the float16 fields (Q4_K/Q5_K: d and dmin
    first; Q6_K: d last) set to sane values."""
    rng = np.random.default_rng(seed)
    size = gguf.GGML_QUANT_SIZES[T[type_name]][1]
    raw = rng.integers(0, 256, size=(rows, k // 256, size), dtype=np.uint8)
    if type_name == "Q6_K":
        raw[..., 208:210] = rng.uniform(0.001, 0.01, size=(rows, k // 256, 1)).astype(np.float16).view(np.uint8)
    else:
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
    assert weight.sub == (16 if type_name == "Q6_K" else 32)
    expected = torch.from_numpy(gguf.dequantize(raw, T[type_name]).reshape(24, k))
    # the same numbers; Q4_0/Q5_0/Q8_0 round d * (q - 8) and d * q - 8d apart in the last bit
    torch.testing.assert_close(weight.dequantize(), expected, rtol=1e-6, atol=1e-6)
    # packing is lossless both ways
    assert torch.equal(gguf_blocks.pack(weight.unpacked(), weight.bits), weight.qweight)


def test_types_without_a_kernel_are_not_decoded():
    assert gguf_blocks.decode(np.zeros((2, 110), dtype=np.uint8), "Q3_K") is None


def test_q6_k_writer_round_trips_through_the_gguf_package():
    """The test's own Q6_K blocks are valid: the gguf package reads back about the weights written."""
    w = np.random.default_rng(4).standard_normal((8, 512)).astype(np.float32)
    back = gguf.dequantize(quantize_q6_k(w), T.Q6_K).reshape(8, 512)
    assert np.abs(back - w).max() < 0.05 * np.abs(w).max()


def planes(q: torch.Tensor, act_bits: int) -> list[torch.Tensor]:
    """The kernel's int8 planes of activations q (natural order): q itself, or 15-bit q = 128 h + l."""
    if act_bits == 8:
        return [q.to(torch.int8)]
    q = q.to(torch.int32)
    return [torch.div(q, 128, rounding_mode="floor").to(torch.int8), (q % 128).to(torch.int8)]


def to_kernel_order(q: torch.Tensor, k: int, act_bits: int) -> torch.Tensor:
    """Natural-order activations -> the kernel's bytes: per group of 128, each plane's 128 bytes."""
    order = gguf_blocks._group_order(k, padded=True)
    out = []
    for plane in planes(q, act_bits):
        qa = torch.zeros(q.shape[0], order.numel(), dtype=torch.int8)
        qa[:, order >= 0] = plane[:, order[order >= 0]]
        out.append(qa.view(q.shape[0], -1, 1, 128))
    return torch.cat(out, dim=2).reshape(q.shape[0], -1)


def activations_in_natural_order(qa: torch.Tensor, k: int, act_bits: int = 8) -> torch.Tensor:
    order = gguf_blocks._group_order(k, padded=True)
    n_planes = 2 if act_bits == 15 else 1
    by_plane = qa.view(qa.shape[0], -1, n_planes, 128)
    q = by_plane[:, :, 0].reshape(qa.shape[0], -1).to(torch.int32)
    if n_planes == 2:
        low = by_plane[:, :, 1].reshape(qa.shape[0], -1)
        assert low.ge(0).all()  # the low plane holds 7 bits
        q = q * 128 + low
    out = torch.zeros(qa.shape[0], k, dtype=torch.int32)
    keep = order >= 0
    out[:, order[keep]] = q[:, keep]
    assert q[:, ~keep].eq(0).all()  # the padding of a last, shorter group is zeros
    return out


@pytest.mark.parametrize("act_bits", [8, 15])
@pytest.mark.parametrize("k", [32, 160, 576])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_quantization_matches_the_reference_bit_for_bit(k, dtype, act_bits):
    kernels_or_skip()
    torch.manual_seed(0)
    x = (torch.randn(5, k) * torch.linspace(0.01, 20, k)).to(dtype)
    x[1, :32] = 0  # a zero block: d = 0, q = 0
    qa, d, s = cpu_ops.quantize_q8_blocks(x, act_bits)
    q_ref, d_ref, s_ref = gguf_blocks.quantize_activations(x, act_bits)
    assert q_ref.abs().max().item() == (127 if act_bits == 8 else 16383)
    assert torch.equal(activations_in_natural_order(qa, k, act_bits), q_ref.to(torch.int32))
    assert torch.equal(d, d_ref) and torch.equal(s, s_ref)
    assert d[1, 0].item() == 0 and q_ref[1, :32].eq(0).all()


@pytest.mark.parametrize("vectorised", [True, False], ids=["vector", "portable"])
@pytest.mark.parametrize("bits,sub", [(4, 32), (8, 32), (8, 16)], ids=["4bit", "8bit", "8bit-per16"])
@pytest.mark.parametrize("act_bits", [8, 15])
@pytest.mark.parametrize("k", [32, 96, 160, 576])
def test_kernel_integer_sums_are_exact(vectorised, bits, sub, act_bits, k):
    """With activation scales of 1 and weight scales and mins that are small powers of two, every
    float step is exact, so the kernel's output must equal the reference's integer block sums
    exactly (per 16, the mins multiply the activations' own per-16 sums)."""
    kernels_or_skip()
    if vectorised and not torch.ops.pagedllm_cpu.gguf_gemm_vector_isa():
        pytest.skip("this build has no vector GEMV (AVX-512 VNNI or AVX2)")
    g = torch.Generator().manual_seed(k + bits + sub + act_bits)
    n, m, nb, ns = 37, 6, k // 32, k // sub  # 6 rows: a block of 4 and 2 on their own
    q = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8, generator=g)
    # small activations (both 15-bit planes in use) and integer scales keep every partial sum
    # below 2^24, exact in float32
    top = 15 if act_bits == 8 else 300
    qa_nat = torch.randint(-top, top + 1, (m, k), dtype=torch.int32, generator=g)
    scales = 2.0 ** torch.randint(0, 4, (n, ns), generator=g).float()
    mins = -(2.0 ** torch.randint(0, 4, (n, ns), generator=g).float()) if sub == 16 else torch.zeros(n, ns)
    weight = gguf_blocks.BlockQuantizedWeight(bits, gguf_blocks.pack(q, bits), scales, mins)
    qa = to_kernel_order(qa_nat, k, act_bits)
    ones, zeros = torch.ones(m, nb), torch.zeros(m, nb)
    out = torch.empty(m, n)
    cpu_ops.gguf_gemm(out, (qa, ones, zeros), weight.qweight, weight.scales, weight.mins, None, bits, vectorised)
    sums = gguf_blocks.block_sums(qa_nat, q, sub)  # [m, n, ns] int32
    expected = (sums.double() * scales.double()[None]).sum(-1)
    if sub == 16:
        a_sums = qa_nat.reshape(m, ns, sub).sum(-1).double()  # [m, ns]
        expected += a_sums @ mins.double().T
    assert torch.equal(out, expected.float())


@pytest.mark.parametrize("type_name", gguf_blocks.KERNEL_TYPES)
@pytest.mark.parametrize("rows", [1, 7])
@pytest.mark.parametrize("act_bits", [8, 15])
def test_kernel_matches_the_reference_path(type_name, rows, act_bits):
    kernels_or_skip()
    k = 512 if type_name.endswith("_K") else 576
    weight = gguf_blocks.decode(quantized(type_name, 67, k, seed=1), type_name)
    torch.manual_seed(2)
    x = torch.randn(rows, k)
    bias = torch.randn(67)
    expected = gguf_blocks.block_linear_reference(x, weight, act_bits=act_bits) + bias
    for vectorised in (True, False):
        out = torch.empty(rows, 67)
        cpu_ops.gguf_gemm(out, cpu_ops.quantize_q8_blocks(x, act_bits), weight.qweight, weight.scales, weight.mins,
                          bias, weight.bits, vectorised)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)
    fused = torch.ops.pagedllm_cpu.gguf_linear(x, weight.qweight, weight.scales, weight.mins, bias, weight.bits,
                                               act_bits)
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-4)
    # the scheme's own error against the float product: q8 within 2%, 15 bits 256x closer
    exact = x.double() @ weight.dequantize().double().T + bias.double()
    err = ((expected.double() - exact).abs().max() / exact.abs().max()).item()
    assert err < (0.02 if act_bits == 8 else 1e-4)


@pytest.mark.parametrize("act_bits", [8, 15])
def test_mixed_segments_write_their_own_columns(monkeypatch, act_bits):
    """A fused layer of a 4-bit, an 8-bit, a Q6_K (per-16) and a float part (as Q4_K_M's QKV with a
    Q6_K V, and a type without a kernel)."""
    kernels_or_skip()
    torch.manual_seed(3)
    k = 256
    a = gguf_blocks.decode(quantized("Q4_1", 16, k), "Q4_1")
    b = gguf_blocks.decode(quantized("Q8_0", 8, k), "Q8_0")
    c = gguf_blocks.decode(quantized("Q6_K", 8, k), "Q6_K")
    f = torch.randn(8, k)
    segments = gguf_method._merge([Segment(0, 16, a), Segment(16, 24, b), Segment(24, 32, c), Segment(32, 40, f)])
    assert len(segments) == 4  # Q8_0 and Q6_K are both 8-bit, but per 32 and per 16: not one segment
    x, bias = torch.randn(3, k), torch.randn(40)
    out = gguf_linear(x, segments, 40, bias, act_bits)
    expected = torch.cat([gguf_blocks.block_linear_reference(x, w, act_bits=act_bits) for w in (a, b, c)]
                         + [x @ f.T], dim=1) + bias
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)
    monkeypatch.setattr(cpu_ops, "cpu_kernels_available", lambda: False)
    torch.testing.assert_close(gguf_linear(x, segments, 40, bias, act_bits), expected, rtol=1e-5, atol=1e-4)


def test_activation_bits_setting(monkeypatch):
    monkeypatch.delenv(gguf_method.ACT_BITS_ENV, raising=False)
    # unset: 15 bits where a QKV projection reads them, q8 elsewhere; 15 without a kind (GPTQ/AWQ blocks)
    assert [gguf_method.activation_bits(k) for k in ("qkv", "linear", None)] == [15, 8, 15]
    monkeypatch.setenv(gguf_method.ACT_BITS_ENV, "8")
    assert [gguf_method.activation_bits(k) for k in ("qkv", "linear", None)] == [8, 8, 8]
    monkeypatch.setenv(gguf_method.ACT_BITS_ENV, "15")
    assert [gguf_method.activation_bits(k) for k in ("qkv", "linear", None)] == [15, 15, 15]
    monkeypatch.setenv(gguf_method.ACT_BITS_ENV, "16")
    with pytest.raises(ValueError, match="must be 8 or 15"):
        gguf_method.activation_bits()


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
        widths = {(getattr(m, "kind", "head"), m.gguf_act_bits) for m in runner.model.modules()
                  if hasattr(m, "gguf_act_bits")}
        return [list(o.outputs[0].token_ids) for o in outs], outs, methods, widths
    finally:
        llm.shutdown()


@pytest.mark.parametrize("act_bits", [8, 15, None], ids=["act8", "act15", "per-kind"])
def test_tiny_models_kernels_give_the_reference_paths_tokens(tiny_quantized_gguf, monkeypatch, act_bits):
    kernels_or_skip()
    if act_bits is None:  # the default: QKV projections at 15 bits, the rest at 8
        monkeypatch.delenv(gguf_method.ACT_BITS_ENV, raising=False)
    else:
        monkeypatch.setenv(gguf_method.ACT_BITS_ENV, str(act_bits))
    tokens, outs, methods, widths = greedy(tiny_quantized_gguf, "gguf")
    assert methods == {GGUFLinearMethod}  # every linear layer and the LM head held in blocks
    if act_bits is None:
        assert widths == {("qkv", 15), ("linear", 8), ("head", 8)}
    else:
        assert {bits for _, bits in widths} == {act_bits}
    monkeypatch.setattr(cpu_ops, "cpu_kernels_available", lambda: False)
    ref_tokens, ref_outs, _, _ = greedy(tiny_quantized_gguf, "gguf")
    assert tokens == ref_tokens
    # the chosen tokens' logprobs agree to float rounding. The two paths' float32 sums differ in
    # the last bits; q8 activations mostly round such differences away, 15-bit ones 256x less
    # often, and these random tiny models amplify what passes. Per kind, the 15-bit QKV outputs'
    # last-bit differences reach q8 roundings downstream: one that flips moves a logprob ~0.02
    tol = {8: 1e-4, 15: 5e-3, None: 5e-2}[act_bits]
    for a, b in zip(outs, ref_outs):
        lp = [next(iter(d.values())).logprob for d in a.outputs[0].logprobs]
        ref = [next(iter(d.values())).logprob for d in b.outputs[0].logprobs]
        np.testing.assert_allclose(lp, ref, rtol=tol, atol=tol)


def test_bfloat16_model_kernels_give_the_reference_paths_tokens(tmp_path, monkeypatch):
    """Between the matmuls the model runs in bfloat16; the blocks and their products are the same."""
    kernels_or_skip()
    path = tmp_path / "tiny-llama.gguf"
    write_tiny_gguf(path, "llama", True, quant_type=T.Q4_1)
    tokens, *_ = greedy(path, "gguf", dtype="bfloat16")
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
    _, outs, *_ = greedy(tiny_quantized_gguf, "gguf")
    assert bool(calls) == ("llama" in tiny_quantized_gguf.name)
    monkeypatch.setattr(GGUFDecodeStep, "for_model", classmethod(lambda cls, layers, dtype: None))
    _, ref_outs, *_ = greedy(tiny_quantized_gguf, "gguf")
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


@pytest.mark.slow
def test_tiny_model_with_q6_k_layers(tmp_path, monkeypatch):
    """A tiny Llama laid out as a Q4_K_M file mixes types: V and down projections in Q6_K (here
    with Q8_0 elsewhere, which the gguf package can write). The Q6_K rows are held in blocks of
    16 (not dequantised), decode as transformers loads them, and the kernels give the reference
    path's tokens and, with 15-bit activations, the float32 model's."""
    kernels_or_skip()
    monkeypatch.setenv(gguf_method.ACT_BITS_ENV, "15")  # every layer: the comparison with float32 below
    path = tmp_path / "tiny-q6k.gguf"
    write_tiny_gguf(path, "llama", True, quant_type=T.Q8_0, hidden_size=256, intermediate_size=512,
                    overrides={"attn_v": T.Q6_K, "ffn_down": T.Q6_K})
    hf = _transformers_gguf_tensors(path)
    llm = LLM(model=str(path), quantization="gguf", max_model_len=128, kv_cache_memory_bytes=8 << 20)
    try:
        model = llm.llm_engine.engine_core.core.model_executor.model_runner.model
        down = model.layers[1].mlp.down_proj.gguf_segments
        assert len(down) == 1 and down[0].weight.sub == 16 and down[0].weight.bits == 8
        torch.testing.assert_close(down[0].weight.dequantize(), hf["model.layers.1.mlp.down_proj.weight"],
                                   rtol=1e-6, atol=1e-6)
        qkv = model.layers[0].self_attn.qkv_proj.gguf_segments  # Q8_0 q and k, then the Q6_K v
        assert [s.weight.sub for s in qkv] == [32, 16]
        v = qkv[1].weight.dequantize()
        torch.testing.assert_close(v, hf["model.layers.0.self_attn.v_proj.weight"], rtol=1e-6, atol=1e-6)
    finally:
        llm.shutdown()
    tokens, outs, *_ = greedy(path, "gguf")
    float_tokens, float_outs, *_ = greedy(path, None)
    assert tokens == float_tokens
    monkeypatch.setattr(cpu_ops, "cpu_kernels_available", lambda: False)
    ref_tokens, ref_outs, *_ = greedy(path, "gguf")
    assert tokens == ref_tokens
    for a, b, c in zip(outs, ref_outs, float_outs):
        lp = [next(iter(d.values())).logprob for d in a.outputs[0].logprobs]
        ref = [next(iter(d.values())).logprob for d in b.outputs[0].logprobs]
        flt = [next(iter(d.values())).logprob for d in c.outputs[0].logprobs]
        # as in test_tiny_models_kernels_give_the_reference_paths_tokens with 15-bit activations
        np.testing.assert_allclose(lp, ref, rtol=5e-3, atol=5e-3)
        # the random tiny model amplifies any rounding (its norms are random normals): with q8
        # activations its tokens differ from float32's and logprobs by up to 0.8, with 15 bits 0.07
        np.testing.assert_allclose(lp, flt, atol=0.15)
