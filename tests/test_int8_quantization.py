"""`quantization="int8"` (W8A8 linear layers on CPU, `layers/quantization/int8.py`): the activation
quantiser against its definition, the int8 layer against the same integer arithmetic done by hand,
and a whole generation against Hugging Face transformers running the same scheme."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from pagedllm import LLM, SamplingParams, cpu_ops
from pagedllm.model_executor.layers.quantization import int8, verify_quantization
from pagedllm.model_executor.model_loader import process_weights_after_loading

pytestmark = pytest.mark.skipif(int8.int8_unavailable_reason(torch.device("cpu"), torch.float32) is not None,
                                reason="this torch has no oneDNN int8 matmul")


def reference_int8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The scheme written out in float64: symmetric int8 weights per output channel, asymmetric
    uint8 activations per row, the product of the dequantised values."""
    w = weight.double()
    w_scale = w.abs().amax(dim=1, keepdim=True) / 127
    w_deq = torch.round(w / w_scale).clamp(-127, 127) * w_scale
    xd = x.double()
    levels = int8.activation_levels()
    lo = xd.amin(dim=-1, keepdim=True).clamp(max=0)
    scale = (xd.amax(dim=-1, keepdim=True).clamp(min=0) - lo) / levels
    zero_point = torch.round(-lo / scale)
    x_deq = (torch.round(xd / scale) + zero_point).clamp(0, levels).sub(zero_point).mul(scale)
    y = x_deq @ w_deq.T
    return y if bias is None else y + bias.double()


@pytest.fixture(params=["kernels", "torch ops"])
def kernel_path(request, monkeypatch):
    """Run each test through the C++ kernels and through the PyTorch fallback."""
    if request.param == "torch ops":
        monkeypatch.setattr(cpu_ops, "cpu_kernels_available", lambda: False)
    elif not cpu_ops.cpu_kernels_available():
        pytest.skip("the CPU kernels could not be built here")
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_quantisation_follows_its_definition(kernel_path, dtype):
    torch.manual_seed(0)
    x = torch.randn(37, 300).to(dtype)
    x[0] = 0  # scale 0: all zeros, no division by zero
    x[1] = x[1].abs() + 0.5  # all positive: the range is widened to include 0
    x[2] *= 1000
    q, scale, zero_point = int8.quantize_activations(x)
    levels = int8.activation_levels()  # 255 with VNNI or AMX, else 127
    assert q.dtype == torch.uint8 and q.shape == x.shape and scale.shape == zero_point.shape == (37, 1)
    xf = x.float()
    lo, hi = xf.amin(1, keepdim=True).clamp(max=0), xf.amax(1, keepdim=True).clamp(min=0)
    torch.testing.assert_close(scale, (hi - lo) / levels)
    assert torch.equal(zero_point, torch.round(-lo / torch.where(scale > 0, scale, 1)))
    assert q[0].eq(zero_point[0].to(torch.uint8)).all() and scale[0].item() == 0.0
    assert zero_point[1].item() == 0 and q[1].max().item() == levels
    # every value is within half a step of its reconstruction, and the row's range is used fully
    err = (scale * (q.float() - zero_point) - xf).abs()
    assert (err <= scale * 0.5001 + 1e-6).all()
    assert (q.int().amax(1) - q.int().amin(1))[2:].ge(levels - 1).all()  # rows that cross 0


def test_kernel_and_fallback_quantise_identically(monkeypatch):
    if not cpu_ops.cpu_kernels_available():
        pytest.skip("the CPU kernels could not be built here")
    torch.manual_seed(1)
    x = torch.randn(64, 576) * torch.linspace(0.1, 30, 576)  # channels of very different ranges
    x[3] = 1e-39  # denormal: scale ~0, must give zeros rather than NaN
    x[4] = -2.5  # all negative
    from_kernel = int8.quantize_activations(x)
    monkeypatch.setattr(cpu_ops, "cpu_kernels_available", lambda: False)
    from_torch = int8.quantize_activations(x)
    assert torch.equal(from_kernel[0], from_torch[0])  # the same integers
    torch.testing.assert_close(from_kernel[1], from_torch[1], rtol=2e-7, atol=0)  # (x / 255 or x * (1/255))
    assert torch.equal(from_kernel[2], from_torch[2])
    assert from_kernel[0][3].eq(0).all() and from_kernel[0][4].eq(0).all() and from_kernel[2][4].item() == int8.activation_levels()


def _weight_deq(weight: torch.Tensor) -> torch.Tensor:
    w = weight.double()
    scale = w.abs().amax(dim=1, keepdim=True) / 127
    return torch.round(w / scale).clamp(-127, 127) * scale


def integer_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """What the int8 layer must return, from the activation quantiser's own (q, scale, zero_point)
    (tested above against its definition): the dequantised operands multiplied in float64."""
    q, scale, zero_point = int8.quantize_activations(x)
    y = (scale.double() * (q.double() - zero_point.double())) @ _weight_deq(weight).T
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 32, 300])
def test_int8_layers_compute_the_integer_product(kernel_path, random_linear_layers, dtype, rows):
    qkv, down, x_qkv, x_down = random_linear_layers(dtype, rows, int8.Int8LinearMethod())
    exact = [integer_product(x_qkv, qkv.weight, qkv.bias), integer_product(x_down, down.weight, None)]
    plain = [F.linear(x_qkv.float(), qkv.weight.float(), qkv.bias.float()), F.linear(x_down.float(), down.weight.float())]
    model = torch.nn.ModuleList([qkv, down])
    count, nbytes = process_weights_after_loading(model)["quantised to int8 (W8A8)"]
    assert count == 2 and qkv.weight is None and isinstance(qkv.int8_weight, int8.Int8LinearWeight)
    assert nbytes >= qkv.int8_weight.packed.numel() + down.int8_weight.packed.numel()
    for layer, x, want, approx in zip((qkv, down), (x_qkv, x_down), exact, plain):
        got = layer(x)
        assert got.dtype == dtype and got.shape == want.shape
        # the same integers as the float64 product: only float rounding apart
        tol = dict(atol=1e-4, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.1, rtol=1e-2)
        torch.testing.assert_close(got.double(), want, **tol)
        # and a quantisation's distance from the float product: close, but not equal to it
        rel = ((got.float() - approx).norm() / approx.norm()).item()
        assert 1e-4 < rel < 0.03, rel


def test_int8_linear_takes_any_leading_shape_and_strides(kernel_path):
    torch.manual_seed(0)
    weight, bias = int8.quantize_weight(torch.randn(8, 16)), torch.randn(8)
    x = torch.randn(6, 16)
    flat = int8.int8_linear(x, weight, bias)
    assert torch.equal(int8.int8_linear(x.reshape(2, 3, 16), weight, bias), flat.reshape(2, 3, 8))
    strided = torch.randn(16, 6).t()  # not contiguous
    assert torch.equal(int8.int8_linear(strided, weight, bias), int8.int8_linear(strided.contiguous(), weight, bias))
    assert int8.int8_linear(torch.randn(0, 16), weight, bias).shape == (0, 8)


def _hf_with_int8_linears(model_dir: str) -> torch.nn.Module:
    """transformers' model with every linear layer except the LM head running the reference scheme."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            module.forward = (lambda m: lambda x: reference_int8_linear(x, m.weight, m.bias).float())(module)
    return model


def _prompt_logprobs(llm: LLM, ids: list[int]) -> list[float]:
    out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    return [entry[t].logprob for t, entry in zip(ids[1:], out[0].prompt_logprobs[1:])]


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_generation_matches_transformers_running_the_same_scheme(family, request):
    """Qwen2 has biases on QKV; Qwen3 ties its LM head (which stays float32 under int8)."""
    model_dir = request.getfixturevalue(f"{family}_dir")
    ids = [5, 17, 42, 99, 7, 250, 13, 77, 31, 8, 120, 64, 3, 19, 200, 11]
    llm = LLM(model=model_dir, max_model_len=256, quantization="int8", max_num_batched_tokens=8)  # chunked prefill
    model = llm.llm_engine.model_runner.model
    assert isinstance(model.layers[0].self_attn.qkv_proj.linear_method, int8.Int8LinearMethod)
    assert not isinstance(getattr(model, "lm_head", model.embed_tokens).linear_method, int8.Int8LinearMethod)
    try:
        ours = _prompt_logprobs(llm, ids)
        greedy = llm.generate([{"prompt_token_ids": ids}], SamplingParams(temperature=0.0, max_tokens=8),
                              use_tqdm=False)[0].outputs[0].token_ids
    finally:
        llm.shutdown()
    hf = _hf_with_int8_linears(model_dir)
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), dim=-1)
        plain = torch.log_softmax(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)(
            torch.tensor([ids])).logits[0].double(), dim=-1)
        hf_greedy = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
    want = [ref[i, t].item() for i, t in enumerate(ids[1:])]
    unquantised = [plain[i, t].item() for i, t in enumerate(ids[1:])]
    worst = max(abs(a - b) for a, b in zip(ours, want))
    assert worst < 5e-4, worst  # measured: about 1.5e-6
    # the quantisation is really in effect: float32's logprobs are further away than that
    assert max(abs(a - b) for a, b in zip(ours, unquantised)) > 0.05
    assert greedy == hf_greedy


def test_unsupported_quantization_is_a_clear_error(llama_dir):
    with pytest.raises(ValueError, match="quantization must be one of \\['int8', 'gguf', 'gptq', 'awq', "
                                         "'compressed-tensors'\\] or None, got 'fp8'"):
        LLM(model=llama_dir, quantization="fp8")
    with pytest.raises(ValueError, match="float32 or bfloat16 model, not float16"):
        LLM(model=llama_dir, quantization="int8", dtype="float16")
    with pytest.raises(ValueError, match="runs on CPU .* pass device='cpu'"):
        verify_quantization("int8", torch.device("cuda"), torch.bfloat16)


SEVEN_BIT_CHECK = """
import torch
from pagedllm import cpu_ops
from pagedllm.model_executor.layers.quantization import int8
torch.manual_seed(0)
w, x = torch.randn(64, 512), torch.randn(32, 512) * 10
weight = int8.quantize_weight(w)
w_deq = torch.round(w.double() / weight.scale.double()[:, None]).clamp(-127, 127) * weight.scale.double()[:, None]

def error(q, scale, zero_point):
    acc = torch.ops.onednn.qlinear_pointwise(q, 1.0, 0, weight.packed, weight.scale, weight.zero_points, None,
                                             1.0, 0, torch.float32, "none", [], "")
    want = q.double() @ w_deq.T
    return ((acc.double() - want).abs().max() / want.abs().max()).item()

q, scale, zero_point = int8.quantize_activations(x)
print(int8.activation_levels(), int(q.max()), error(q, scale, zero_point), error(*cpu_ops.quantize_per_token(x, 255)))
"""


def test_without_vnni_activations_get_seven_bits():
    """oneDNN limited to AVX2 (no VNNI, no AMX) sums uint8 x int8 pairs in 16 bits: full-range
    activations saturate there, 7-bit ones do not. The probe notices and the quantiser follows."""
    if not cpu_ops.cpu_kernels_available():
        pytest.skip("the CPU kernels could not be built here")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "1", "PAGEDLLM_LOGGING_LEVEL": "WARNING"}
    out = subprocess.run([sys.executable, "-c", SEVEN_BIT_CHECK], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    levels, q_max, err_7bit, err_8bit = out.stdout.split()
    assert int(levels) == 127 and int(q_max) == 127
    assert float(err_7bit) < 1e-6  # exact integer products
    assert float(err_8bit) > 1e-3  # what 8-bit activations would have given on this ISA
