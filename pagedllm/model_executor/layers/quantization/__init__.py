"""Which `LinearMethod` each kind of layer of a model is built with, from `quantization`, dtype and device.

The one place that knows every method: the layers take the method they are given, the model
loader processes whatever methods the model holds. vLLM's `quantization` names the scheme
(`config.QUANTIZATION_METHODS` lists the ones implemented here). int8 never quantizes the LM head,
as in vLLM, since it added about half again to the perplexity change (docs/performance.md); "gguf"
keeps whatever the file holds, the LM head included, as llama.cpp does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pagedllm.model_executor.layers.cpu_packed_linear import CpuPackedLinearMethod, cpu_packing_available
from pagedllm.model_executor.layers.linear_method import UNQUANTIZED, LinearMethodBase
from pagedllm.model_executor.layers.quantization.checkpoint import CHECKPOINT_QUANTIZATION
from pagedllm.model_executor.layers.quantization.gguf import GGUFLinearMethod, gguf_unavailable_reason
from pagedllm.model_executor.layers.quantization.int8 import Int8LinearMethod, int8_unavailable_reason
from pagedllm.utils import env_flag

# GPTQ/AWQ/compressed-tensors layers in the GGUF kernel's 4-bit blocks on CPU (`checkpoint_form`)
CPU_INT4_BLOCKS_ENV = "PAGEDLLM_CPU_INT4_BLOCKS"


@dataclass(frozen=True)
class LinearMethods:
    linear: LinearMethodBase  # the decoder layers' QKV, O, gate/up and down projections
    lm_head: LinearMethodBase  # an untied output projection
    tied_lm_head: LinearMethodBase  # the embedding's logits, where the LM head is tied to it
    # an untied embedding, only looked up: None keeps the plain matrix; a method that loads the
    # weight itself (GGUF blocks) holds it in its own form and looks rows up
    embedding: LinearMethodBase | None = None


def get_linear_methods(quantization: str | None, dtype: torch.dtype, device: torch.device,
                       quant_config: Any = None) -> LinearMethods:
    """`quant_config`: a pre-quantized checkpoint's settings (`checkpoint.py`), whose method loads its
    packed tensors and hands the dequantized matrix to the plain method."""
    if cpu_packing_available(device, dtype):
        plain, tied = CpuPackedLinearMethod(), CpuPackedLinearMethod(keep_weight=True)
    else:
        plain = tied = UNQUANTIZED
    if quantization == "gguf":  # every weight the file quantised stays so, the LM head too (as llama.cpp)
        gguf_method = GGUFLinearMethod(device)
        return LinearMethods(linear=gguf_method, lm_head=gguf_method, tied_lm_head=gguf_method, embedding=gguf_method)
    if quant_config is not None:
        linear = quant_config.linear_method(plain, checkpoint_form(device, dtype))
    else:
        linear = Int8LinearMethod() if quantization == "int8" else plain
    return LinearMethods(linear=linear, lm_head=plain, tied_lm_head=tied)


def checkpoint_form(device: torch.device, dtype: torch.dtype) -> str:
    """What a pre-quantized checkpoint's layers hold (`packed_int.FORMS`): packed for the Triton kernel
    on GPUs; on CPU the float matrix, dequantized once (the dequantized model's numbers), or with
    `PAGEDLLM_CPU_INT4_BLOCKS=1` the integers in the GGUF kernel's blocks, whose 15-bit activations
    move tiny random models' logprobs by up to ~3e-3 (docs/quantization_gptq_awq.md)."""
    if device.type == "cuda":
        return "triton"
    if env_flag(CPU_INT4_BLOCKS_ENV, default=False) and gguf_unavailable_reason(device, dtype) is None:
        return "blocks"
    return "dequantized"


def verify_quantization(quantization: str | None, device: torch.device, dtype: torch.dtype) -> None:
    """A clear ValueError, before anything loads, when `quantization` cannot run on this device and
    dtype (`ModelConfig` has already refused the names that are not implemented)."""
    if quantization is None or quantization in CHECKPOINT_QUANTIZATION:  # plain PyTorch: any device
        return
    reason = (gguf_unavailable_reason if quantization == "gguf" else int8_unavailable_reason)(device, dtype)
    if reason is not None:
        raise ValueError(f"quantization={quantization!r} cannot run here: {reason}")


def resolve_quantization(quantization: str | None, model_path: str) -> str | None:
    """The `quantization` to run: "gguf" needs a GGUF file."""
    if quantization == "gguf":
        from pagedllm.model_executor.gguf_loader import is_gguf_file

        if not is_gguf_file(model_path):
            raise ValueError(f"quantization='gguf' reads a GGUF file's own blocks, and {model_path} is not a GGUF file")
    return quantization
