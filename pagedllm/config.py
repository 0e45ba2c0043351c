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

# vLLM's `kv_cache_dtype` values this engine can store ('auto': the model's dtype). 'fp8' is e4m3, as
# in vLLM; the fp8 ones keep a per-tensor scale per layer (`attention/kv_quant.py`).
KV_CACHE_DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "fp8": torch.float8_e4m3fn,
                   "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}

# vLLM's `quantization` values this engine implements (None: the checkpoint's weights as loaded).
# "gguf" keeps a GGUF file's blocks as they are; "gptq", "awq" and "compressed-tensors" name the format a
# pre-quantized checkpoint is saved in.
QUANTIZATION_METHODS = ("int8", "gguf", "gptq", "awq", "compressed-tensors")


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
    # vLLM's `quantization`: None, "int8" (W8A8 on CPU: layers/quantization/int8.py), "gguf" (a GGUF's blocks
    # kept as they are: layers/quantization/gguf.py), or a pre-quantized checkpoint's format, "gptq" / "awq" /
    # "compressed-tensors" (layers/quantization/checkpoint.py)
    quantization: Optional[str] = None
    # that checkpoint's settings (group size, act order, ...: a GPTQConfig, AWQConfig, CompressedTensorsConfig)
    quant_config: Optional[Any] = None
    # most logprobs a request may ask for (-1: no limit), checked by the input processor
    max_logprobs: int = 20
    # the folder whose generation_config.json gives sampling defaults (None: none)
    generation_config: Optional[str] = None
    trust_remote_code: bool = False
    # vLLM's `runner`: "generate", or "pooling" with the pooler it uses (`pooler_config`).
    runner_type: str = "generate"
    pooler_config: Optional[PoolerConfig] = None
    # A vision-language model's input limits: images per prompt (vLLM's `limit_mm_per_prompt`, 999 by
    # default) and the hosts whose http(s) image URLs may be fetched (none by default: data URLs only).
    limit_mm_per_prompt: Optional[dict[str, int]] = None
    allowed_media_domains: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.runner_type not in RUNNER_TYPES:
            raise ValueError(f"runner must be one of {list(RUNNER_TYPES)}, got {self.runner_type!r}")
        if (self.runner_type == "pooling") != (self.pooler_config is not None):
            raise ValueError("a pooling model needs a pooler config, and only a pooling model has one")
        for modality, limit in (self.limit_mm_per_prompt or {}).items():
            if modality != "image" or not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
                raise ValueError(f"limit_mm_per_prompt takes {{'image': count >= 0}}, got {{{modality!r}: {limit!r}}}")
        if not isinstance(self.max_logprobs, int) or self.max_logprobs < -1:
            raise ValueError(f"max_logprobs must be -1 (no limit) or a non-negative integer, got {self.max_logprobs!r}")
        if self.quantization is not None and self.quantization not in QUANTIZATION_METHODS:
            raise ValueError(
                f"quantization must be one of {list(QUANTIZATION_METHODS)} or None, got {self.quantization!r} "
                "(fp8 checkpoints are not implemented)")

    @property
    def text_config(self) -> Any:
        """The language model's config: the checkpoint's own, or a vision-language model's `text_config`."""
        return text_config_of(self.hf_config)

    @property
    def is_multimodal(self) -> bool:
        return self.text_config is not self.hf_config

    @property
    def num_layers(self) -> int:
        return self.text_config.num_hidden_layers

    @property
    def num_kv_heads(self) -> int:
        c = self.text_config
        return getattr(c, "num_key_value_heads", None) or c.num_attention_heads

    @property
    def head_dim(self) -> int:
        c = self.text_config
        return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def text_config_of(hf_config: Any) -> Any:
    """A vision-language checkpoint's language-model config (its KV cache, vocabulary and context are
    the text model's); any other checkpoint's own config."""
    get = getattr(hf_config, "get_text_config", None)
    return get() if get is not None else hf_config


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
    # cache, whose reads bound decode attention on CPU (math stays float32; see docs/performance.md);
    # 'fp8' / 'fp8_e4m3' / 'fp8_e5m2' quarter it (8-bit floats with per-layer scales).
    cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {sorted(KV_CACHE_DTYPES)}, got {self.cache_dtype!r}")
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


# vLLM's speculative methods: the ones implemented, and the others it has (refused by name).
SPECULATIVE_METHODS = ("ngram", "draft_model", "eagle")
VLLM_SPECULATIVE_METHODS = ("eagle3", "mtp", "medusa", "mlp_speculator", "suffix",
                            "ngram_gpu")
# `speculative_config` keys vLLM defines that only its other methods or tuning use: accepted at None.
_VLLM_ONLY_SPECULATIVE_KEYS = ("quantization", "max_model_len", "revision", "code_revision",
                               "draft_tensor_parallel_size", "disable_by_batch_size", "disable_padded_drafter_batch",
                               "speculative_token_tree", "parallel_drafting", "enforce_eager")


@dataclass(frozen=True)
class SpeculativeConfig:
    """vLLM's `speculative_config`: propose `num_speculative_tokens` tokens per step and verify them in one
    forward pass of the target model. `method="ngram"` (prompt lookup) proposes the tokens that followed the
    longest earlier match, between `prompt_lookup_min` and `prompt_lookup_max` tokens long, of the sequence's
    last tokens (both default to 5 when neither is given, as in vLLM). `method="draft_model"` runs `model`, a
    small model of the target's tokenizer, k times per step to propose its greedy continuation; its config
    (`draft_model_config`, a `ModelConfig`) is filled in by `EngineArgs`, which reads the checkpoint.
    `method="eagle"` runs `model`, an EAGLE-1 head (one Llama decoder layer on the target's hidden states,
    `model_executor/models/eagle.py`), whose config goes in `draft_model_config` the same way. Built
    from the user's dict by `from_dict`, which names the key or value it refuses."""

    method: str
    num_speculative_tokens: int
    prompt_lookup_min: Optional[int] = None
    prompt_lookup_max: Optional[int] = None
    model: Optional[str] = None  # the draft model (draft_model / eagle methods)
    draft_model_config: Optional["ModelConfig"] = None  # draft_model / eagle: the draft checkpoint, resolved

    def __post_init__(self) -> None:
        if self.method in VLLM_SPECULATIVE_METHODS:
            raise NotImplementedError(f"speculative_config={{'method': {self.method!r}, ...}} is not supported by "
                                      f"pagedllm yet (speculative methods implemented: {list(SPECULATIVE_METHODS)})")
        if self.method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative_config method must be one of {list(SPECULATIVE_METHODS)}, "
                             f"got {self.method!r}")
        k = self.num_speculative_tokens
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"speculative_config num_speculative_tokens must be a positive integer, got {k!r}")
        if self.method in ("draft_model", "eagle"):
            if not self.model:
                what = "the draft checkpoint" if self.method == "draft_model" else "the EAGLE head's checkpoint"
                raise ValueError(f"speculative_config method {self.method!r} needs 'model', {what}")
            return
        lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
        for name, value in (("prompt_lookup_min", lo), ("prompt_lookup_max", hi)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"speculative_config {name} must be a positive integer, got {value!r}")
        if lo is None and hi is None:
            lo = hi = 5
        lo, hi = (hi if lo is None else lo), (lo if hi is None else hi)
        if lo > hi:
            raise ValueError(f"speculative_config prompt_lookup_min ({lo}) must be <= prompt_lookup_max ({hi})")
        object.__setattr__(self, "prompt_lookup_min", lo)
        object.__setattr__(self, "prompt_lookup_max", hi)

    @classmethod
    def from_dict(cls, config: Optional[dict]) -> Optional["SpeculativeConfig"]:
        """None or {} asks for nothing. The method is required, unless a `model` names a draft model (then
        "draft_model", as vLLM infers it)."""
        if not config:
            return None
        if not isinstance(config, dict):
            raise ValueError(f"speculative_config must be a dict, got {type(config).__name__}")
        config = dict(config)
        for key in _VLLM_ONLY_SPECULATIVE_KEYS:
            if config.pop(key, None) is not None:
                raise NotImplementedError(f"speculative_config={{{key!r}: ...}} is not supported by pagedllm yet")
        names = {"method", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max", "model"}
        unknown = sorted(set(config) - names)
        if unknown:
            raise ValueError(f"speculative_config has unknown keys {unknown}; known: {sorted(names)}")
        method = config.pop("method", None) or ("draft_model" if config.get("model") else None)
        if method is None:
            raise ValueError("speculative_config needs a 'method' (e.g. 'ngram')")
        if "num_speculative_tokens" not in config:
            raise ValueError("speculative_config needs 'num_speculative_tokens'")
        return cls(method=method, **config)


DISTRIBUTED_EXECUTOR_BACKENDS = ("mp", "ray", "uni")


# vLLM's VLLM_PP_LAYER_PARTITION under our prefix: layers per stage, e.g. "5,3" for 8 layers on 2 stages.
PP_LAYER_PARTITION_ENV = "PAGEDLLM_PP_LAYER_PARTITION"


@dataclass(frozen=True)
class ParallelConfig:
    """vLLM's names: `tensor_parallel_size` workers split each layer; `pipeline_parallel_size` stages
    each hold a contiguous run of the layers (tp x pp workers in all); `data_parallel_size` engine
    replicas (the server's) each hold the whole model. The backend says who starts the workers and
    replicas: `mp` (torch.multiprocessing on this machine), `ray` (actors on a Ray cluster) or `uni`
    (in this process; one worker only). None picks `uni` for one worker, else `mp`.
    `pp_layer_partition`: layers per stage instead of the even split (`$PAGEDLLM_PP_LAYER_PARTITION`).
    `enable_expert_parallel`: a mixture-of-experts layer places whole experts on the tensor-parallel
    ranks instead of splitting every expert (`layers/fused_moe/layer.py`)."""

    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    distributed_executor_backend: Optional[str] = None
    pipeline_parallel_size: int = 1
    pp_layer_partition: Optional[tuple[int, ...]] = None
    enable_expert_parallel: bool = False

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        backend = self.distributed_executor_backend
        if backend is not None and backend not in DISTRIBUTED_EXECUTOR_BACKENDS:
            raise ValueError(
                f"distributed_executor_backend must be one of {DISTRIBUTED_EXECUTOR_BACKENDS} or None, got {backend!r}"
            )
        if backend == "uni" and self.world_size > 1:
            raise ValueError("distributed_executor_backend='uni' runs in one process: it needs tensor_parallel_size=1 "
                             "and pipeline_parallel_size=1")
        partition = self.pp_layer_partition
        if partition is not None and (len(partition) != self.pipeline_parallel_size
                                      or any(not isinstance(n, int) or n < 1 for n in partition)):
            raise ValueError(f"the layer partition {list(partition)} must give each of the "
                             f"{self.pipeline_parallel_size} pipeline stages at least one layer")

    @property
    def world_size(self) -> int:
        """Workers of one engine: tp x pp."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def output_rank(self) -> int:
        """The worker whose step output the engine reads: tensor-parallel rank 0 of the last stage,
        the only stage that samples."""
        return (self.pipeline_parallel_size - 1) * self.tensor_parallel_size

    @property
    def executor_backend(self) -> str:
        if self.distributed_executor_backend is not None:
            return self.distributed_executor_backend
        return "uni" if self.world_size == 1 else "mp"

    def verify_with_model(self, hf_config: Any, device: torch.device, runner_type: str = "generate") -> None:
        """The layouts tensor and pipeline parallelism cannot split, refused before any worker starts."""
        if text_config_of(hf_config) is not hf_config and self.world_size > 1:
            raise ValueError("vision-language models run in one process (tensor_parallel_size=1, "
                             "pipeline_parallel_size=1) for now")
        hf_config = text_config_of(hf_config)
        self._verify_pipeline(hf_config, runner_type)
        tp = self.tensor_parallel_size
        if tp > 1:
            num_heads = hf_config.num_attention_heads
            num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or num_heads
            for name, value in (("num_attention_heads", num_heads), ("num_key_value_heads", num_kv_heads),
                                ("intermediate_size", hf_config.intermediate_size)):
                if value % tp:
                    raise ValueError(
                        f"tensor_parallel_size ({tp}) must divide the model's {name} ({value}): each worker "
                        "holds an equal share"
                    )
            num_experts = getattr(hf_config, "num_local_experts", None) or getattr(hf_config, "num_experts", None)
            if num_experts:  # a mixture of experts: split whole experts, or each expert's intermediate size
                experts = (("number of experts", num_experts) if self.enable_expert_parallel else
                           ("moe_intermediate_size", getattr(hf_config, "moe_intermediate_size", None)
                            or hf_config.intermediate_size))
                shared = ("shared_expert_intermediate_size",
                          getattr(hf_config, "shared_expert_intermediate_size", 0) or 0)
                for name, value in (experts, shared):
                    if value % tp:
                        raise ValueError(f"tensor_parallel_size ({tp}) must divide the model's {name} ({value}): "
                                         "each worker holds an equal share")
        if device.type == "cuda" and self.world_size > 1:
            count = torch.cuda.device_count()
            if self.world_size > count and self.executor_backend != "ray":
                raise ValueError(
                    f"tensor_parallel_size x pipeline_parallel_size ({self.world_size}) is larger than the number "
                    f"of CUDA devices on this machine ({count}); use distributed_executor_backend='ray' to span machines"
                )

    def _verify_pipeline(self, hf_config: Any, runner_type: str) -> None:
        pp = self.pipeline_parallel_size
        if pp == 1:
            return
        if runner_type != "generate":
            raise ValueError(f"pipeline_parallel_size={pp} runs generative decoder models; a {runner_type} model "
                             "runs in one stage")
        num_layers = hf_config.num_hidden_layers
        if pp > num_layers:
            raise ValueError(f"pipeline_parallel_size ({pp}) is larger than the model's {num_layers} layers: "
                             "every stage needs at least one")
        partition = self.pp_layer_partition
        if partition is not None and sum(partition) != num_layers:
            raise ValueError(f"the layer partition {list(partition)} ({PP_LAYER_PARTITION_ENV}) covers "
                             f"{sum(partition)} layers; the model has {num_layers}")


def parse_pp_layer_partition(text: Optional[str]) -> Optional[tuple[int, ...]]:
    """'5,3' -> (5, 3); None or '' -> None (the even split)."""
    if not text:
        return None
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"{PP_LAYER_PARTITION_ENV} must be comma-separated layer counts such as '5,3', "
                         f"got {text!r}") from None


@dataclass(frozen=True)
class EngineConfig:
    model_config: ModelConfig
    cache_config: CacheConfig
    scheduler_config: SchedulerConfig
    device: torch.device
    parallel_config: ParallelConfig = field(default_factory=ParallelConfig)
    structured_outputs_backend: str = "auto"  # the grammar engine of structured outputs ("auto": xgrammar)
    lora_config: Optional[LoRAConfig] = None  # None: LoRA off (`enable_lora=False`)
    speculative_config: Optional[SpeculativeConfig] = None  # None: one token per request per step

    @property
    def kv_cache_dtype(self) -> torch.dtype:
        """The dtype K/V are stored in (`kv_cache_dtype`, else the model's)."""
        return self.cache_config.kv_cache_torch_dtype(self.model_config.dtype)
