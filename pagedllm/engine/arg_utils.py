"""`EngineArgs`: the user-facing knobs (vLLM's names and defaults) turned into validated configs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from pagedllm.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    resolve_device,
    resolve_dtype,
)
from pagedllm.logger import init_logger
from pagedllm.model_executor.layers.int8_quantization import check_quantization

logger = init_logger(__name__)


# vLLM's defaults for max_num_batched_tokens by usage context (on hardware it has not tuned for).
DEFAULT_MAX_NUM_BATCHED_TOKENS = {"llm_class": 8192, "openai_api_server": 2048}
# The CPU server steps half as many tokens as vLLM's CPU server (2048): a step of CPU prefill takes
# seconds, and a burst's median time to first token is set by the chunk its prompt lands in. On W1
# served to 32 clients (docs/performance.md) 1024 kept 94-97% of the offline throughput (2048: 97%)
# and cut the median TTFT from 1.85 s to 1.35-1.6 s (two runs).
CPU_SERVER_MAX_NUM_BATCHED_TOKENS = 1024


def default_max_num_batched_tokens(usage_context: str, device: torch.device) -> int:
    if usage_context == "openai_api_server" and device.type == "cpu":
        return CPU_SERVER_MAX_NUM_BATCHED_TOKENS
    return DEFAULT_MAX_NUM_BATCHED_TOKENS[usage_context]


@dataclass
class EngineArgs:
    model: Optional[str] = None
    tokenizer: Optional[str] = None
    dtype: str = "auto"
    seed: int = 0
    max_model_len: Optional[int] = None
    max_num_seqs: int = 256
    max_num_batched_tokens: Optional[int] = None
    block_size: int = 16
    kv_cache_dtype: str = "auto"
    # None, or "int8": W8A8 linear layers on CPU (layers/int8_quantization.py)
    quantization: Optional[str] = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    num_gpu_blocks_override: Optional[int] = None
    kv_cache_memory_bytes: Optional[int] = None
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool = False
    # None: on for CUDA unless enforce_eager (where fusing saves kernel launches and memory passes),
    # off on CPU (there it gains ~2% on W1 and costs start-up compile time).
    compile_fused_ops: Optional[bool] = None
    device: str = "auto"
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    distributed_executor_backend: Optional[str] = None
    # Who drives the engine, as vLLM's UsageContext: it picks the default step budget when
    # max_num_batched_tokens is not given (offline throughput wants big steps; a server wants
    # small ones, so a burst of prompts is chunked and the first ones start decoding sooner).
    usage_context: str = "llm_class"

    def load_hf_config(self, model_path: str) -> Any:
        from pagedllm.model_executor.gguf_loader import is_gguf_file, load_gguf_config

        if is_gguf_file(model_path):
            return load_gguf_config(model_path)
        from transformers import AutoConfig

        if not os.path.isfile(os.path.join(model_path, "config.json")):
            raise ValueError(f"{model_path} is not a Hugging Face checkpoint directory (no config.json)")
        return AutoConfig.from_pretrained(model_path)

    def create_engine_config(self, model_path: str, hf_config: Any) -> EngineConfig:
        device = resolve_device(self.device)
        parallel_config = ParallelConfig(
            tensor_parallel_size=self.tensor_parallel_size,
            data_parallel_size=self.data_parallel_size,
            distributed_executor_backend=self.distributed_executor_backend,
        )
        parallel_config.verify_with_model(hf_config, device)
        max_pos = getattr(hf_config, "max_position_embeddings", None) or 2048
        sliding = getattr(hf_config, "sliding_window", None)
        if sliding and getattr(hf_config, "use_sliding_window", True) and sliding < max_pos:
            # Attention here is always full; capping the context at the window keeps results exact.
            logger.warning("Model uses a sliding window of %d tokens; max_model_len is capped to it", sliding)
            max_pos = sliding
        max_model_len = self.max_model_len or max_pos
        if max_model_len > max_pos:
            raise ValueError(
                f"max_model_len ({max_model_len}) is larger than the model's maximum context ({max_pos})"
            )
        if max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {max_model_len}")
        if self.usage_context not in DEFAULT_MAX_NUM_BATCHED_TOKENS:
            raise ValueError(f"usage_context must be one of {sorted(DEFAULT_MAX_NUM_BATCHED_TOKENS)}, "
                             f"got {self.usage_context!r}")
        default_batched = default_max_num_batched_tokens(self.usage_context, device)
        batched = self.max_num_batched_tokens or max(default_batched, self.max_num_seqs)
        if not self.enable_chunked_prefill and self.max_num_batched_tokens is None:
            batched = max(batched, max_model_len)
        config_dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
        model_config = ModelConfig(
            model=model_path,
            tokenizer=self.tokenizer or model_path,
            hf_config=hf_config,
            dtype=resolve_dtype(self.dtype, config_dtype, device),
            max_model_len=max_model_len,
            vocab_size=hf_config.vocab_size,
            seed=self.seed,
            enforce_eager=self.enforce_eager,
            compile_fused_ops=(self.compile_fused_ops if self.compile_fused_ops is not None
                               else device.type == "cuda" and not self.enforce_eager),
            quantization=self.quantization,
        )
        check_quantization(model_config.quantization, device, model_config.dtype)
        return EngineConfig(
            model_config=model_config,
            cache_config=CacheConfig(
                block_size=self.block_size,
                enable_prefix_caching=self.enable_prefix_caching,
                num_gpu_blocks_override=self.num_gpu_blocks_override,
                kv_cache_memory_bytes=self.kv_cache_memory_bytes,
                gpu_memory_utilization=self.gpu_memory_utilization,
                cache_dtype=self.kv_cache_dtype,
            ),
            scheduler_config=SchedulerConfig(
                max_num_seqs=self.max_num_seqs,
                max_num_batched_tokens=batched,
                max_model_len=max_model_len,
                enable_chunked_prefill=self.enable_chunked_prefill,
            ),
            device=device,
            parallel_config=parallel_config,
        )
