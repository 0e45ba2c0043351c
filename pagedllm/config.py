"""Engine configuration: frozen dataclasses validated once, trusted everywhere after.

The split follows vLLM's: what the model is (`ModelConfig`), how the KV cache is laid out
(`CacheConfig`), what the scheduler may run per step (`SchedulerConfig`), over how many devices
and replicas it runs (`ParallelConfig`), and on which device. `EngineConfig` bundles them for the
engine and its workers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}

# vLLM's `kv_cache_dtype` values this engine can store ('auto': the model's dtype). vLLM's fp8
# ones ('fp8', 'fp8_e4m3', 'fp8_e5m2', ...) need per-layer scales, which are not implemented.
KV_CACHE_DTYPES = {"auto": None, "bfloat16": torch.bfloat16}

# vLLM's `quantization` values this engine implements (None: the checkpoint's weights as loaded).
QUANTIZATION_METHODS = ("int8", "gguf")


def resolve_device(device: str) -> torch.device:
    """'auto' means CUDA when a GPU is present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was requested but no CUDA device is available")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, config_dtype: Any, device: torch.device) -> torch.dtype:
    """'auto' takes the checkpoint's dtype on GPU, and float32 on CPU (where bf16/fp16 are slow)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        if isinstance(config_dtype, str):
            config_dtype = _DTYPES.get(config_dtype, torch.bfloat16)
        if config_dtype in (None, torch.float32):
            return torch.bfloat16
        return config_dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of 'auto', 'float32', 'bfloat16', 'float16', got {dtype!r}")
    return _DTYPES[dtype]


# vLLM's runners: a model either generates tokens or pools its hidden states into one vector per prompt.
RUNNER_TYPES = ("generate", "pooling")
# The pooling methods a pooler can use (vLLM's `PoolingType` names).
POOLING_TYPES = ("LAST", "CLS", "MEAN")


@dataclass(frozen=True)
class PoolerConfig:
    """How a pooling model turns a prompt's hidden states into one vector, read from the checkpoint
    (`model_executor/pooling_config.py`). `task`: what the model is for, "embed" (a vector) or "classify"
    (label scores, of which a cross-encoder's single one is its relevance score). `normalize`: L2-normalise
    embeddings unless a request says otherwise."""

    pooling_type: str
    task: str = "embed"
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.pooling_type not in POOLING_TYPES:
            raise ValueError(f"pooling_type must be one of {list(POOLING_TYPES)}, got {self.pooling_type!r}")
        if self.task not in ("embed", "classify"):
            raise ValueError(f"pooler task must be 'embed' or 'classify', got {self.task!r}")


@dataclass(frozen=True)
class ModelConfig:
    model: str
    tokenizer: str
    hf_config: Any  # transformers.PretrainedConfig
    dtype: torch.dtype
    max_model_len: int
    vocab_size: int
    seed: int
    enforce_eager: bool = False
    # torch.compile of the elementwise ops between matmuls (layers/fused_ops.py)
    compile_fused_ops: bool = False
    # vLLM's `quantization`: None, "int8" (W8A8 on CPU: layers/quantization/int8.py) or "gguf" (a GGUF's
    # blocks kept as they are: layers/quantization/gguf.py)
    quantization: Optional[str] = None
    # most logprobs a request may ask for (-1: no limit), checked by the input processor
    max_logprobs: int = 20
    # the folder whose generation_config.json gives sampling defaults (None: none)
    generation_config: Optional[str] = None
    trust_remote_code: bool = False
    # vLLM's `runner`: "generate", or "pooling" with the pooler it uses (`pooler_config`).
    runner_type: str = "generate"
    pooler_config: Optional[PoolerConfig] = None

    def __post_init__(self) -> None:
        if self.runner_type not in RUNNER_TYPES:
            raise ValueError(f"runner must be one of {list(RUNNER_TYPES)}, got {self.runner_type!r}")
        if (self.runner_type == "pooling") != (self.pooler_config is not None):
            raise ValueError("a pooling model needs a pooler config, and only a pooling model has one")
        if not isinstance(self.max_logprobs, int) or self.max_logprobs < -1:
            raise ValueError(f"max_logprobs must be -1 (no limit) or a non-negative integer, got {self.max_logprobs!r}")
        if self.quantization is not None and self.quantization not in QUANTIZATION_METHODS:
            raise ValueError(
                f"quantization must be one of {list(QUANTIZATION_METHODS)} or None, got {self.quantization!r} "
                "(pre-quantised checkpoints such as AWQ, GPTQ or fp8 are not implemented)")

    @property
    def num_layers(self) -> int:
        return self.hf_config.num_hidden_layers

    @property
    def num_kv_heads(self) -> int:
        return getattr(self.hf_config, "num_key_value_heads", None) or self.hf_config.num_attention_heads

    @property
    def head_dim(self) -> int:
        c = self.hf_config
        return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    enable_prefix_caching: bool = True
    num_gpu_blocks_override: Optional[int] = None
    # The byte budget of each worker's cache. On CPU it is always set (EngineArgs fills in
    # $PAGEDLLM_CPU_KVCACHE_SPACE or 4 GiB); on GPU None means "what gpu_memory_utilization leaves".
    kv_cache_memory_bytes: Optional[int] = None
    gpu_memory_utilization: float = 0.9
    # vLLM's kv_cache_dtype: 'auto' stores K/V in the model's dtype; 'bfloat16' halves a float32
    # cache, whose reads bound decode attention on CPU (math stays float32; see docs/performance.md).
    cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.cache_dtype not in KV_CACHE_DTYPES:
            hint = " (fp8 KV caches are not implemented)" if self.cache_dtype.startswith("fp8") else ""
            raise ValueError(f"kv_cache_dtype must be one of {sorted(KV_CACHE_DTYPES)}, got {self.cache_dtype!r}{hint}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {self.block_size}")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 1:
            raise ValueError(f"num_gpu_blocks_override must be >= 1, got {self.num_gpu_blocks_override}")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise ValueError(f"kv_cache_memory_bytes must be positive, got {self.kv_cache_memory_bytes}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")

    def kv_cache_torch_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The dtype K/V are stored in."""
        return KV_CACHE_DTYPES[self.cache_dtype] or model_dtype


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    enable_chunked_prefill: bool = True
    # log every scheduling decision per request (core/request_trace.py)
    trace: bool = False

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) is smaller than max_model_len "
                f"({self.max_model_len}) with chunked prefill disabled: long prompts could never run."
            )


@dataclass(frozen=True)
class LoRAConfig:
    """vLLM's LoRA knobs: `max_loras` adapters may run in one step (the slots every LoRA layer keeps),
    each of rank at most `max_lora_rank`; up to `max_cpu_loras` loaded adapters stay in host memory."""

    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: Optional[int] = None  # None: max_loras

    def __post_init__(self) -> None:
        for name in ("max_loras", "max_lora_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_cpu_loras is None:
            object.__setattr__(self, "max_cpu_loras", self.max_loras)
        if not isinstance(self.max_cpu_loras, int) or self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras!r}) must be an integer >= max_loras "
                             f"({self.max_loras})")


DISTRIBUTED_EXECUTOR_BACKENDS = ("mp", "ray", "uni")


@dataclass(frozen=True)
class ParallelConfig:
    """vLLM's names: `tensor_parallel_size` workers split each layer; `data_parallel_size` engine
    replicas (the server's) each hold the whole model. The backend says who starts the workers and
    replicas: `mp` (torch.multiprocessing on this machine), `ray` (actors on a Ray cluster) or `uni`
    (in this process; tp=1 only). None picks `uni` for tp=1, else `mp`."""

    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    distributed_executor_backend: Optional[str] = None

    def __post_init__(self) -> None:
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be a positive integer, got {self.tensor_parallel_size!r}")
        if not isinstance(self.data_parallel_size, int) or self.data_parallel_size < 1:
            raise ValueError(f"data_parallel_size must be a positive integer, got {self.data_parallel_size!r}")
        backend = self.distributed_executor_backend
        if backend is not None and backend not in DISTRIBUTED_EXECUTOR_BACKENDS:
            raise ValueError(
                f"distributed_executor_backend must be one of {DISTRIBUTED_EXECUTOR_BACKENDS} or None, got {backend!r}"
            )
        if backend == "uni" and self.tensor_parallel_size > 1:
            raise ValueError("distributed_executor_backend='uni' runs in one process: it needs tensor_parallel_size=1")

    @property
    def executor_backend(self) -> str:
        if self.distributed_executor_backend is not None:
            return self.distributed_executor_backend
        return "uni" if self.tensor_parallel_size == 1 else "mp"

    def verify_with_model(self, hf_config: Any, device: torch.device) -> None:
        """The layouts tensor parallelism cannot split, refused before any worker starts."""
        tp = self.tensor_parallel_size
        if tp == 1:
            return
        num_heads = hf_config.num_attention_heads
        num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or num_heads
        for name, value in (("num_attention_heads", num_heads), ("num_key_value_heads", num_kv_heads),
                            ("intermediate_size", hf_config.intermediate_size)):
            if value % tp:
                raise ValueError(
                    f"tensor_parallel_size ({tp}) must divide the model's {name} ({value}): each worker "
                    "holds an equal share"
                )
        if device.type == "cuda":
            count = torch.cuda.device_count()
            if tp > count and self.executor_backend != "ray":
                raise ValueError(
                    f"tensor_parallel_size ({tp}) is larger than the number of CUDA devices on this machine "
                    f"({count}); use distributed_executor_backend='ray' to span machines"
                )


@dataclass(frozen=True)
class EngineConfig:
    model_config: ModelConfig
    cache_config: CacheConfig
    scheduler_config: SchedulerConfig
    device: torch.device
    parallel_config: ParallelConfig = field(default_factory=ParallelConfig)
    structured_outputs_backend: str = "auto"  # the grammar engine of structured outputs ("auto": xgrammar)
    lora_config: Optional[LoRAConfig] = None  # None: LoRA off (`enable_lora=False`)

    @property
    def kv_cache_dtype(self) -> torch.dtype:
        """The dtype K/V are stored in (`kv_cache_dtype`, else the model's)."""
        return self.cache_config.kv_cache_torch_dtype(self.model_config.dtype)
