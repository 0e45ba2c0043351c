"""Building a model and filling it with checkpoint weights (safetensors or GGUF)."""

from __future__ import annotations

import time

import torch

from pagedllm.attention.selector import get_attention_backend
from pagedllm.config import ModelConfig
from pagedllm.distributed.parallel_state import TensorParallelGroup
from pagedllm.logger import init_logger
from pagedllm.model_executor.layers.cpu_weight_packing import pack_linear_weights, pack_tied_lm_head, packing_wanted
from pagedllm.model_executor.layers.int8_quantization import quantize_linear_weights
from pagedllm.model_executor.layers.fused_ops import fused_ops_for
from pagedllm.model_executor.layers.linear import LinearBase
from pagedllm.model_executor.layers.rotary_embedding import RotaryEmbedding
from pagedllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from pagedllm.model_executor.models import SUPPORTED_ARCHITECTURES, get_architecture
from pagedllm.model_executor.weight_utils import iterate_safetensors_weights

logger = init_logger(__name__)


def load_model(model_config: ModelConfig, device: torch.device,
               tp_group: TensorParallelGroup | None = None) -> torch.nn.Module:
    """The model, or this tensor-parallel rank's share of it (each rank reads the full checkpoint)."""
    arch = get_architecture(model_config.hf_config)
    start = time.perf_counter()
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(model_config.dtype)
    try:
        # Built on the meta device: no time is spent on random initialisation that the
        # checkpoint overwrites anyway (load_weights checks every parameter is loaded).
        with torch.device("meta"):
            model = SUPPORTED_ARCHITECTURES[arch](
                model_config.hf_config, arch, model_config.max_model_len, model_config.dtype,
                get_attention_backend(device), tp_group,
            )
    finally:
        torch.set_default_dtype(old_dtype)
    model = model.to_empty(device=device)
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.init_cache()
    model.load_weights(_iterate_weights(model_config))
    model.eval().requires_grad_(False)
    ops = fused_ops_for(device, model_config.compile_fused_ops)
    for module in model.modules():
        if hasattr(module, "fused_ops"):
            module.fused_ops = ops
    num_params = sum(p.numel() for p in model.parameters())
    quantized = int8_bytes = packed = tied_copy = 0
    if model_config.quantization == "int8":
        # The linear layers only: the LM head stays in the model's dtype, as in vLLM, since in
        # int8 it added about half again to the perplexity change (docs/performance.md).
        quantized, int8_bytes = quantize_linear_weights(model, (LinearBase,))
    if packing_wanted(device, model_config.dtype):
        packed = pack_linear_weights(model, (LinearBase, ParallelLMHead))  # skips the int8 ones
        if getattr(model, "tie_word_embeddings", False):
            tied_copy = pack_tied_lm_head(model.embed_tokens)
    logger.info(
        "Loaded %s weights (%s, %.1fM parameters%s%s%s) in %.2f s",
        arch,
        str(model_config.dtype).removeprefix("torch."),
        num_params / 1e6,
        f", {quantized} linear weights quantised to int8 (W8A8, {int8_bytes / 2**20:.0f} MiB)" if quantized else "",
        f", {packed} linear weights packed for oneDNN" if packed else "",
        f", the tied LM head packed beside the embedding (+{tied_copy / 2**20:.0f} MiB)" if tied_copy else "",
        time.perf_counter() - start,
    )
    return model


def _iterate_weights(model_config: ModelConfig):
    from pagedllm.model_executor.gguf_loader import is_gguf_file, iterate_gguf_weights

    if is_gguf_file(model_config.model):
        return iterate_gguf_weights(model_config.model, model_config.dtype)
    return iterate_safetensors_weights(model_config.model, model_config.dtype)
