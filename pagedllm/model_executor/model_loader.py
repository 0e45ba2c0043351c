"""Building a model and filling it with checkpoint weights (safetensors or GGUF).

Three phases, as vLLM's loader: build the model on the meta device with its `BuildContext` (each
layer takes its linear method, fused ops and attention backend then), load the checkpoint's
tensors into it, then let every layer's linear method turn its loaded weight into its own form
(`process_weights_after_loading`: packed for oneDNN, quantized to int8, ...). The loader does not
know what any method does.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Callable

import torch
from torch import nn

from pagedllm.config import ModelConfig
from pagedllm.logger import init_logger
from pagedllm.model_executor.layers.build_context import BuildContext
from pagedllm.model_executor.layers.pooler import Pooler
from pagedllm.model_executor.layers.rotary_embedding import RotaryEmbedding
from pagedllm.model_executor.models import SUPPORTED_ARCHITECTURES, get_architecture
from pagedllm.model_executor.weight_utils import iterate_safetensors_weights

logger = init_logger(__name__)


def build_empty(make: Callable[[], nn.Module], dtype: torch.dtype, device: torch.device) -> nn.Module:
    """`make()`'s module in `dtype` on `device`, its parameters uninitialised (for load_weights to fill) and
    its rotary tables computed. Built on the meta device: no time is spent on random initialisation that the
    checkpoint overwrites anyway (load_weights checks every parameter is loaded)."""
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = make()
    finally:
        torch.set_default_dtype(old_dtype)
    model = model.to_empty(device=device)
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.init_cache()
    return model


def load_model(model_config: ModelConfig, device: torch.device, ctx: BuildContext) -> nn.Module:
    """The model, or this tensor-parallel rank's share of it (each rank reads the full checkpoint)."""
    arch = get_architecture(model_config.hf_config)
    start = time.perf_counter()
    model = build_empty(lambda: SUPPORTED_ARCHITECTURES[arch](model_config.hf_config, arch, ctx), model_config.dtype,
                        device)
    model.load_weights(_iterate_weights(model_config))
    model.eval().requires_grad_(False)
    num_params = sum(p.numel() for p in model.parameters())
    processed = process_weights_after_loading(model)
    if model_config.runner_type == "pooling":
        # vLLM's `as_embedding_model` adapter in one line: any model's final hidden states can be pooled;
        # a classifier brings its own head.
        model.pooler = Pooler(model_config.pooler_config, getattr(model, "classify", None))
    logger.info(
        "Loaded %s weights (%s, %.1fM parameters%s) in %.2f s",
        arch, str(model_config.dtype).removeprefix("torch."), num_params / 1e6,
        "".join(f", {count} {'' if what.startswith('MoE') else 'linear weights '}{what} ({nbytes / 2**20:.0f} MiB)"
                for what, (count, nbytes) in processed.items()),
        time.perf_counter() - start,
    )
    return model


def process_weights_after_loading(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Hand every layer to its linear method once its weights are in. Returns, per method that
    has something to report, (how many layers, the bytes their weights now take)."""
    counts: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    for module in model.modules():
        # a linear layer's method, or a fused-MoE layer's (vLLM's `quant_method`)
        method = getattr(module, "linear_method", None) or getattr(module, "quant_method", None)
        if method is None:
            continue
        method.process_weights_after_loading(module)
        # a method may hold some of its layers in another form (`describe`: GPTQ blocks that fall back)
        description = method.describe(module) if hasattr(method, "describe") else method.description
        if description is not None:
            counts[description] += 1
            sizes[description] += method.weight_bytes(module)
    return {what: (counts[what], sizes[what]) for what in counts}


def _iterate_weights(model_config: ModelConfig):
    from pagedllm.model_executor.gguf_loader import is_gguf_file, iterate_gguf_weights

    if is_gguf_file(model_config.model):
        return iterate_gguf_weights(model_config.model, model_config.dtype,
                                    keep_quantized=model_config.quantization == "gguf")
    return iterate_safetensors_weights(model_config.model, model_config.dtype)
