"""The many-row GGUF kernel (`csrc/cpu/gguf_gemm_tiled.cpp`) against the PyTorch reference: exact
integer block sums, every kernel type at row counts on both sides of its 8-row register tile and
the 256-row pass, odd shapes (rows of a last 16-row tile missing, groups of fewer than 4 blocks),
the automatic choice between it and the GEMV, and tiny GGUF models whose prompts and batches take
it giving the reference path's greedy tokens."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from test_gguf_loader import write_tiny_gguf
from test_gguf_quantized import kernels_or_skip, quantized

from pagedllm import LLM, SamplingParams, cpu_ops
from pagedllm.model_executor.layers.quantization import gguf_blocks

ROWS = [1, 3, 8, 33, 130]


def tiled_or_skip() -> None:
    kernels_or_skip()
    if cpu_ops.gguf_gemm_tiled_min_rows() == 0:
        pytest.skip("this CPU has no AVX-512 VNNI: gguf_linear runs the GEMV at every row count")


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k", [32, 96, 160, 576])
def test_tiled_integer_sums_are_exact(rows, bits, k):
    """Activation scales of 1, weight scales that are small powers of two: every float step is
    exact, so the output must equal the reference's integer block sums exactly."""
    tiled_or_skip()
    g = torch.Generator().manual_seed(k * 7 + bits + rows)
    n, nb = 37, k // 32  # 37: a last tile of 5 rows
    q = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8, generator=g)
    qa_nat = torch.randint(-15, 16, (rows, k), dtype=torch.int8, generator=g)
    scales = 2.0 ** torch.randint(0, 4, (n, nb), generator=g).float()
    weight = gguf_blocks.BlockQuantizedWeight(bits, gguf_blocks.pack(q, bits), scales, torch.zeros(n, nb))
    order = gguf_blocks._group_order(k, padded=True)
    qa = torch.zeros(rows, order.numel(), dtype=torch.int8)
    qa[:, order >= 0] = qa_nat[:, order[order >= 0]]
    out = torch.full((rows, n), float("nan"))
    cpu_ops.gguf_gemm_tiled(out, (qa, torch.ones(rows, nb), torch.zeros(rows, nb)), weight.qweight, weight.scales,
                            weight.mins, None, bits)
    expected = (gguf_blocks.block_sums(qa_nat, q).double() * scales.double()[None]).sum(-1).float()
    assert torch.equal(out, expected)


@pytest.mark.parametrize("act_bits", [8, 15])
@pytest.mark.parametrize("type_name", gguf_blocks.KERNEL_TYPES)
def test_tiled_matches_the_reference_path(type_name, act_bits):
    """Every type, with its mins (Q4_1 and the K types' min term; Q6_K's scale and min per 16), q8
    and 15-bit activations, several row counts, into a strided column slice of a wider output as a
    fused layer's segment writes."""
    tiled_or_skip()
    k = 768 if type_name.endswith("_K") else 224  # 224: a last group of 3 blocks
    n = 67
    weight = gguf_blocks.decode(quantized(type_name, n, k, seed=5), type_name)
    assert weight.scales.shape[1] == k // (16 if type_name == "Q6_K" else 32)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(1))
    for rows in ROWS + [300]:  # 300: more than one 256-row pass over a packed tile
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
        expected = gguf_blocks.block_linear_reference(x, weight, act_bits=act_bits) + bias
        wide = torch.full((rows, n + 9), float("nan"))
        out = wide[:, 4:4 + n]
        cpu_ops.gguf_gemm_tiled(out, cpu_ops.quantize_q8_blocks(x, act_bits), weight.qweight, weight.scales, weight.mins, bias,
                                weight.bits)
        # float rounding of sums in another order, which grows with the outputs (Q6_K's reach ~1e3)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4 + 1e-6 * expected.abs().max().item())
        assert wide[:, :4].isnan().all() and wide[:, 4 + n:].isnan().all()  # nothing written outside the slice


def auto_matches(weight: gguf_blocks.BlockQuantizedWeight, rows: int, act_bits: int = 15) -> str:
    """Which kernel `gguf_gemm_auto` (what gguf_linear calls) ran for `rows`, judged by bit-equal output."""
    x = torch.randn(rows, weight.shape[1], generator=torch.Generator().manual_seed(rows))
    acts = cpu_ops.quantize_q8_blocks(x, act_bits)
    n, args = weight.shape[0], (weight.qweight, weight.scales, weight.mins, None, weight.bits)
    auto = cpu_ops.gguf_gemm_auto(torch.empty(rows, n), acts, *args)
    tiled = cpu_ops.gguf_gemm_tiled(torch.empty(rows, n), acts, *args)
    gemv = cpu_ops.gguf_gemm(torch.empty(rows, n), acts, *args, vectorised=True)
    torch.testing.assert_close(tiled, gemv, rtol=1e-5, atol=1e-4)
    assert not torch.equal(tiled, gemv)  # float sums in another order: the two are told apart
    return "tiled" if torch.equal(auto, tiled) else "gemv" if torch.equal(auto, gemv) else "neither"


def test_gguf_linear_takes_the_tiled_kernel_from_its_row_threshold():
    """The GEMV below the threshold, the tiled kernel from it on; for a weight over 8 MiB (an LM
    head, streamed from memory) from 16 rows."""
    tiled_or_skip()
    threshold = cpu_ops.gguf_gemm_tiled_min_rows()
    small = gguf_blocks.decode(quantized("Q4_1", 48, 576, seed=2), "Q4_1")
    assert [auto_matches(small, r) for r in (threshold - 1, threshold, threshold + 5)] == ["gemv", "tiled", "tiled"]
    assert [auto_matches(small, r, act_bits=8) for r in (threshold - 1, threshold)] == ["gemv", "tiled"]
    per16 = gguf_blocks.decode(quantized("Q6_K", 48, 512, seed=4), "Q6_K")  # a scale and min per 16: from 6 rows
    assert [auto_matches(per16, r) for r in (threshold, 5, 6)] == ["gemv", "gemv", "tiled"]
    large = gguf_blocks.decode(quantized("Q8_0", 16400, 576, seed=3), "Q8_0")  # 9.4 MB of bytes
    assert [auto_matches(large, r) for r in (threshold, 15, 16)] == ["gemv", "gemv", "tiled"]


def test_tiled_rejects_mismatched_activations():
    tiled_or_skip()
    weight = gguf_blocks.decode(quantized("Q4_0", 16, 256), "Q4_0")
    qa, d, s = cpu_ops.quantize_q8_blocks(torch.randn(5, 128))  # k = 128, the weight's is 256
    with pytest.raises(RuntimeError, match="qa must come from quantize_q8_blocks"):
        cpu_ops.gguf_gemm_tiled(torch.empty(5, 16), (qa, d, s), weight.qweight, weight.scales, weight.mins, None, 4)


@pytest.mark.parametrize("arch,tie,type_name", [("llama", True, "Q4_1"), ("qwen2", False, "Q5_1")])
def test_tiny_models_long_prompts_give_the_reference_paths_tokens(arch, tie, type_name, tmp_path, monkeypatch):
    """Prompts of 40-90 tokens and 6 sequences decoding together: prefill and decode steps both
    have enough rows for the tiled kernel (4-bit layers with a tied Q4_1 LM head; 8-bit ones)."""
    tiled_or_skip()
    path = tmp_path / f"tiny-{arch}.gguf"
    write_tiny_gguf(path, arch, tie, quant_type=gguf.GGMLQuantizationType[type_name])
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 250, size=int(n)).tolist() for n in (40, 57, 64, 71, 83, 90)]
    assert min(len(prompts), min(map(len, prompts))) >= cpu_ops.gguf_gemm_tiled_min_rows()

    def run() -> list[list[int]]:
        llm = LLM(model=str(path), quantization="gguf", max_model_len=160, kv_cache_memory_bytes=8 << 20)
        try:
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                                SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)
            return [list(o.outputs[0].token_ids) for o in outs]
        finally:
            llm.shutdown()

    tokens = run()
    monkeypatch.setattr(cpu_ops, "cpu_kernels_available", lambda: False)
    assert tokens == run()

