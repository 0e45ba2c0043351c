"""`Int8LinearMethod`: W8A8 int8 linear layers on CPU (`quantization="int8"`), the scheme llama.cpp's
speed comes from.

A float32 decode step reads every weight once per step, and on two cores that reading is most of
the step; a prefill step is bound by the float32 FMAs. Both shrink with int8: weights are a
quarter of float32's bytes, and the CPU's int8 units (AMX tiles, AVX-512 VNNI) do several times
more multiply-adds per cycle. llama.cpp does the same with its 4-bit weights: it quantises each
activation row to int8 and multiplies integers.

The scheme is dynamic W8A8 int8, as vLLM's CPU build runs it with asymmetric ("azp") activations:
- weights: symmetric int8 per output channel (scale = max |w| of the row / 127), quantised once
  after loading from whatever the checkpoint holds (a GGUF's Q4_1 is dequantised first);
- activations: asymmetric uint8 per token (row), quantised on every call (`cpu_ops.quantize_per_token`):
  each row's own range onto 0..255, which on SmolLM2 halved symmetric int8's perplexity change
  (0..127 on CPUs without VNNI or AMX, where 8-bit products would saturate: `activation_levels`);
- the integer matmul is oneDNN's (`onednn::qlinear_pointwise`, int32 accumulation), which applies
  the weight scales. oneDNN takes one activation scale and zero point per tensor, so the per-token
  ones are applied after it, in one pass with the bias (`cpu_ops.dequantize_int8_output`):
  out = scale * (acc - zero_point * wsum) + bias, wsum being the weight's scaled row sums.
Everything between the linear layers (norms, rotary, attention, the KV cache) keeps the model's
dtype. The change in quality is stated by `benchmarks/precision_check.py` (see docs/performance.md).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from pagedllm import cpu_ops
from pagedllm.logger import init_logger
from pagedllm.model_executor.layers.cpu_packed_linear import BATCH_SIZE_HINT
from pagedllm.model_executor.layers.linear_method import LinearMethodBase

logger = init_logger(__name__)

INT8_DTYPES = (torch.float32, torch.bfloat16)


@functools.cache
def activation_levels() -> int:
    """255 where oneDNN multiplies uint8 by int8 exactly on this machine (AMX, AVX-512 VNNI,
    AVX-VNNI), else 127. Without VNNI oneDNN sums pairs of products in 16 bits (vpmaddubsw), which
    saturate on full-range inputs (255 * 127 * 2 > 32767), so activations get 7 bits, as PyTorch's
    own x86 int8 backend does (`reduce_range`). Probed once with the worst case, not read from CPU
    flags, so that it follows whatever oneDNN dispatches to (ONEDNN_MAX_CPU_ISA included)."""
    k = 64
    weight = torch.ops.onednn.qlinear_prepack(torch.full((16, k), 127, dtype=torch.int8), [1, k])
    acc = torch.ops.onednn.qlinear_pointwise(torch.full((1, k), 255, dtype=torch.uint8), 1.0, 0, weight,
                                             torch.ones(16), torch.zeros(16, dtype=torch.int64), None, 1.0, 0,
                                             torch.float32, "none", [], "")
    exact = acc[0, 0].item() == 255 * 127 * k
    if not exact:
        logger.info("int8: this CPU's uint8 x int8 products would saturate on 8-bit activations; using 7 bits")
    return 255 if exact else 127


def int8_unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why `quantization="int8"` cannot run here, or None when it can."""
    if device.type != "cpu":
        return f"it runs on CPU (oneDNN's int8 matmul), not on {device.type}; pass device='cpu' (--device cpu)"
    if dtype not in INT8_DTYPES:
        return f"it takes a float32 or bfloat16 model, not {str(dtype).removeprefix('torch.')}"
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.onednn, "qlinear_pointwise"):
        return "this PyTorch build has no oneDNN int8 matmul (torch.ops.onednn.qlinear_pointwise)"
    return None


@dataclass
class Int8LinearWeight:
    """A linear weight as oneDNN's int8 matmul takes it: the prepacked int8 matrix [out, in], one
    float32 scale per output channel (symmetric: the zero points oneDNN's signature asks for are
    all zero), and `wsum` = scale * the row sums of the int8 matrix, which takes the activations'
    zero points back out of the product."""

    packed: torch.Tensor
    scale: torch.Tensor
    zero_points: torch.Tensor
    wsum: torch.Tensor
    out_features: int

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + 2 * self.scale.numel() * 4


def quantize_weight(weight: torch.Tensor) -> Int8LinearWeight:
    """Symmetric per-output-channel int8 of a float weight [out, in], packed for oneDNN."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    wsum = (q.sum(dim=1, dtype=torch.int64).float() * scale).contiguous()
    packed = torch.ops.onednn.qlinear_prepack(q, [BATCH_SIZE_HINT, w.shape[1]])
    return Int8LinearWeight(packed, scale.contiguous(), torch.zeros(w.shape[0], dtype=torch.int64), wsum, w.shape[0])


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row asymmetric uint8 of a 2-D activation: (q, scale, zero_point), x ≈ scale * (q - zero_point);
    the C++ kernel when it is built, the same arithmetic in PyTorch ops otherwise."""
    levels = activation_levels()
    if cpu_ops.cpu_kernels_available():
        return cpu_ops.quantize_per_token(x, levels)
    xf = x.float()
    lo = xf.amin(dim=1, keepdim=True).clamp_(max=0)
    scale = (xf.amax(dim=1, keepdim=True).clamp_(min=0) - lo) / levels
    inv = torch.where(scale >= torch.finfo(torch.float32).tiny, 1 / scale, torch.zeros_like(scale))
    zero_point = torch.round(-lo * inv)
    q = (torch.round(xf * inv) + zero_point).clamp_(0, levels).to(torch.uint8)
    return q, scale, zero_point


def int8_linear(x: torch.Tensor, weight: Int8LinearWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T + b in int8: the activation quantised per token, the integer product taken back to x's
    dtype per row (float32 accumulation of the scaled product, so the zero-point correction does
    not cancel away bf16 digits)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    if x2.shape[0] == 0:
        return x.new_empty(*shape[:-1], weight.out_features)
    q, scale, zero_point = quantize_activations(x2)
    acc = torch.ops.onednn.qlinear_pointwise(q, 1.0, 0, weight.packed, weight.scale, weight.zero_points, None,
                                             1.0, 0, torch.float32, "none", [], "")
    if cpu_ops.cpu_kernels_available():
        out = acc if x.dtype == torch.float32 else torch.empty(acc.shape, dtype=x.dtype)
        cpu_ops.dequantize_int8_output(out, acc, scale, zero_point, weight.wsum, bias)
    else:
        out = acc.sub_(zero_point * weight.wsum).mul_(scale)
        out = (out if bias is None else out.add_(bias)).to(x.dtype)
    return out.reshape(*shape[:-1], weight.out_features)


class Int8LinearMethod(LinearMethodBase):
    """Loads the float matrix (a GGUF's is dequantised on the way in), then keeps only its int8
    form (`layer.int8_weight`): a quarter of float32's bytes."""

    description = "quantised to int8 (W8A8)"

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        layer.int8_weight = quantize_weight(layer.weight)
        layer.register_parameter("weight", None)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return int8_linear(x, layer.int8_weight, bias)

    def weight_bytes(self, layer: nn.Module) -> int:
        return layer.int8_weight.nbytes


