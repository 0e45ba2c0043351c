"""The GPU path of `quantization="gguf"` (`triton_gguf_matmul.py`): the Triton kernel reading the
blocked form against the gguf package's own dequantisation, for every type held in blocks, a layer
of mixed segments, the embedding's rows, and a tiny GGUF model against its dequantised float32 run.

Without a GPU the kernel runs under TRITON_INTERPRET=1 (tests/conftest.py) on CPU tensors; on a GPU
these tests run it compiled on CUDA tensors (`benchmarks/gpu_check.py`'s kernel_tests)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from test_gguf_loader import write_tiny_gguf
from test_gguf_quantized import quantized

from pagedllm import LLM, SamplingParams
from pagedllm.model_executor.layers.quantization import gguf as gguf_method
from pagedllm.model_executor.layers.quantization import gguf_blocks
from pagedllm.model_executor.layers.quantization.gguf import GGUFLinearMethod, Segment
from pagedllm.model_executor.layers.quantization.triton_gguf_matmul import (
    embedding,
    gguf_block_matmul,
    triton_gguf_linear,
)

T = gguf.GGMLQuantizationType
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
N = 37  # a partial tile of output rows


def blocks(type_name: str, rows: int, k: int, seed: int = 0) -> tuple[gguf_blocks.BlockQuantizedWeight, torch.Tensor]:
    """Random blocks of `type_name` in the blocked form on DEVICE, and the gguf package's float32
    dequantisation of the same raw bytes."""
    raw = quantized(type_name, rows, k, seed)
    w = gguf_blocks.decode(raw, type_name)
    w = gguf_blocks.BlockQuantizedWeight(w.bits, w.qweight.to(DEVICE), w.scales.to(DEVICE), w.mins.to(DEVICE))
    return w, torch.from_numpy(gguf.dequantize(raw, T[type_name]).reshape(rows, k)).to(DEVICE)


def assert_close_to(out: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """Within `rel` of the expected product's largest magnitude (a float32 sum's rounding grows with it)."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(out.double(), expected, rtol=rel, atol=rel * scale)


@pytest.mark.parametrize("type_name", gguf_blocks.KERNEL_TYPES)
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_kernel_equals_x_times_the_dequantized_matrix(type_name, with_bias):
    """Odd batch sizes (1, 3, 17), a partial tile of rows, K a multiple of 32 but not of the K-tile
    (160: also a last group of one block in the 8-bit order), K split over programs or not."""
    k = 512 if type_name.endswith("_K") else 160
    w, w_ref = blocks(type_name, N, k)
    torch.manual_seed(1)
    bias = torch.randn(N, device=DEVICE) if with_bias else None
    for m in (1, 3, 17):
        x = torch.randn(m, k, device=DEVICE)
        expected = x.double() @ w_ref.double().T + (0 if bias is None else bias.double())
        for split_k in (1, 3):
            out = torch.full((m, N), float("nan"), device=DEVICE)
            gguf_block_matmul(x, w, out, bias, split_k=split_k)
            assert_close_to(out, expected, 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("type_name", ["Q4_1", "Q8_0", "Q6_K"])  # the three forms: 4-bit, 8-bit, 8-bit per 16
def test_half_precision_activations(type_name, dtype):
    """The tile is dequantised in float32 and rounded to the activations' dtype for `tl.dot`, which sums
    in float32: off the float product by about that rounding."""
    k = 256
    w, w_ref = blocks(type_name, N, k, seed=2)
    torch.manual_seed(3)
    x = torch.randn(5, k, device=DEVICE).to(dtype)
    bias = torch.randn(N, device=DEVICE).to(dtype)
    out = torch.empty(5, N, dtype=dtype, device=DEVICE)
    gguf_block_matmul(x, w, out, bias)
    expected = x.double() @ w_ref.double().T + bias.double()
    assert_close_to(out, expected, 1e-2)


def test_mixed_segments_write_their_own_columns():
    """A fused layer of 4-bit, 8-bit, Q6_K (per-16) and float32 rows (as a Q4_K_M file's QKV with a
    Q6_K V, and a type without a kernel), with a bias, in the activations' dtype."""
    k = 256
    parts = [blocks("Q4_1", 16, k), blocks("Q8_0", 8, k, seed=1), blocks("Q6_K", 8, k, seed=2)]
    torch.manual_seed(4)
    f = torch.randn(5, k, device=DEVICE)
    segments, start = [], 0
    for w, _ in parts:
        segments.append(Segment(start, start + w.shape[0], w))
        start += w.shape[0]
    segments = gguf_method._merge([*segments, Segment(start, start + 5, f)])
    assert len(segments) == 4
    x, bias = torch.randn(2, 3, k, device=DEVICE), torch.randn(start + 5, device=DEVICE)
    out = triton_gguf_linear(x, segments, start + 5, bias)
    w_ref = torch.cat([ref for _, ref in parts] + [f])
    assert out.shape == (2, 3, start + 5) and out.dtype == torch.float32
    assert_close_to(out, x.double() @ w_ref.double().T + bias.double(), 1e-5)


def test_embedding_rows_are_the_dequantized_rows():
    k = 256
    parts = [blocks("Q4_K", 6, k), blocks("Q6_K", 5, k, seed=1), blocks("Q5_0", 4, k, seed=2)]
    segments, start = [], 0
    for w, _ in parts:
        segments.append(Segment(start, start + w.shape[0], w))
        start += w.shape[0]
    w_ref = torch.cat([ref for _, ref in parts])
    ids = torch.tensor([[14, 0, 7], [5, 6, 11]], device=DEVICE)  # every segment, and their edges
    for dtype in (torch.float32, torch.bfloat16):
        rows = embedding(segments, ids, k, dtype)
        assert rows.shape == (2, 3, k) and rows.dtype == dtype
        torch.testing.assert_close(rows, w_ref[ids].to(dtype), rtol=1e-6, atol=1e-6)
    local = torch.tensor([4, 0, 2, 4], device=DEVICE)  # rows of one segment, one twice
    torch.testing.assert_close(parts[1][0].rows(local).dequantize(), parts[1][1][local], rtol=1e-6, atol=1e-6)


def test_bad_shapes_are_refused():
    w, _ = blocks("Q8_0", 4, 64)
    with pytest.raises(ValueError, match="multiples of 32"):
        gguf_block_matmul(torch.randn(2, 96, device=DEVICE), w, torch.empty(2, 4, device=DEVICE))
    with pytest.raises(ValueError, match="activations must be one of"):
        gguf_block_matmul(torch.randn(2, 64, device=DEVICE).double(), w, torch.empty(2, 4, device=DEVICE))


def test_devices_and_dtypes_gguf_runs_on():
    reason = gguf_method.gguf_unavailable_reason
    assert reason(torch.device("cuda"), torch.float16) is None  # the Triton kernel (triton is installed here)
    assert reason(torch.device("cuda"), torch.bfloat16) is None
    assert "float32, bfloat16 or float16" in reason(torch.device("cuda"), torch.float64)
    assert "CPU (C++) and CUDA (Triton), not on mps" in reason(torch.device("mps"), torch.float32)
    assert "float32 or bfloat16" in reason(torch.device("cpu"), torch.float16)  # the C++ kernels'
    assert GGUFLinearMethod(torch.device("cuda")).triton and not GGUFLinearMethod(torch.device("cpu")).triton


# ----- a whole model ----------------------------------------------------------------------------------

PROMPTS = [[3, 70, 101, 200, 17], [260, 5, 9, 44, 88, 120, 31, 7, 250]]


def greedy(path, quantization: str | None) -> tuple[list, dict, list]:
    # small steps: the interpreter's time grows with the rows of a step (and the start-up's dummy step)
    llm = LLM(model=str(path), quantization=quantization, max_model_len=64, kv_cache_memory_bytes=4 << 20,
              device=DEVICE.type, enforce_eager=True, max_num_batched_tokens=64, max_num_seqs=2)
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                            SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=1), use_tqdm=False)
        model = llm.llm_engine.engine_core.core.model_executor.model_runner.model
        held = {name: (m.linear_method.triton, [type(s.weight).__name__ for s in m.gguf_segments])
                for name, m in model.named_modules() if hasattr(m, "gguf_segments")}
        logprobs = [[next(iter(d.values())).logprob for d in o.outputs[0].logprobs] for o in outs]
        return [list(o.outputs[0].token_ids) for o in outs], held, logprobs
    finally:
        llm.shutdown()


@pytest.mark.parametrize("arch,tie,type_name", [("qwen2", True, "Q4_1"), ("llama", False, "Q8_0")],
                         ids=["qwen2-tied-Q4_1", "llama-untied-Q8_0"])
def test_tiny_model_on_the_triton_path_gives_the_float_models_tokens(arch, tie, type_name, tmp_path, monkeypatch):
    """A tiny GGUF held in blocks and multiplied by the Triton kernel (on CPU: forced with
    `runs_triton`, and interpreted) gives the tokens of the same file dequantised to float32, and
    logprobs within float rounding: the kernel does not quantise activations, so that model is its
    reference. Qwen2: QKV biases, a 4-bit tied embedding that is also the LM head; Llama: 8-bit, an
    untied LM head."""
    from pagedllm.model_executor.models.gguf_decode_step import GGUFDecodeStep

    path = tmp_path / f"tiny-{arch}.gguf"
    write_tiny_gguf(path, arch, tie, quant_type=T[type_name])
    float_tokens, _, float_logprobs = greedy(path, None)
    monkeypatch.setattr(gguf_method, "runs_triton", lambda device: True)
    # the one-op CPU decode step (C++, float32 Llama layers) would take the decode steps of CPU tensors;
    # it never runs on CUDA (it needs the CPU kernels' fused ops)
    monkeypatch.setattr(GGUFDecodeStep, "for_model", classmethod(lambda cls, layers, dtype: None))
    tokens, held, logprobs = greedy(path, "gguf")
    assert held and all(triton and kinds == ["BlockQuantizedWeight"] for triton, kinds in held.values())
    assert any(name.endswith("embed_tokens") for name in held)  # looked up (and, tied, multiplied by) in blocks
    assert any(name.endswith("lm_head") for name in held) == (not tie)
    assert tokens == float_tokens
    np.testing.assert_allclose(logprobs, float_logprobs, rtol=1e-3, atol=1e-3)
