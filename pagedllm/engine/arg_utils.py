"""`EngineArgs`: the one list of engine arguments, with vLLM's names and defaults.

Every knob is a field here, once: `LLM(**kwargs)` builds an `EngineArgs` from its keywords, and
every command line (`pagedllm generate|chat|serve|bench`) gets its engine flags from
`EngineArgs.add_cli_args`, generated from the fields (vLLM's `add_cli_args`). A field's help,
flag spelling and choices sit beside its default. Environment variables are only documented
defaults, read when the arguments are made (`trace` from `PAGEDLLM_TRACE`, the CPU KV-cache budget
from `PAGEDLLM_CPU_KVCACHE_SPACE`); nothing downstream reads them. `create_engine_config` turns
the arguments into the validated, frozen configs of `config.py`.

An argument vLLM has and pagedllm does not implement yet (`VLLM_ONLY_ARGS`) is accepted only at
vLLM's default: any other value raises `NotImplementedError` naming it, so a script never runs
something other than what it asked for. A name nobody has raises `TypeError`, as in vLLM.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from pagedllm.config import (
    KV_CACHE_DTYPES,
    PP_LAYER_PARTITION_ENV,
    QUANTIZATION_METHODS,
    CacheConfig,
    EngineConfig,
    LoRAConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    SpeculativeConfig,
    parse_pp_layer_partition,
    resolve_device,
    resolve_dtype,
    text_config_of,
)
from pagedllm.logger import init_logger
from pagedllm.utils import env_flag

logger = init_logger(__name__)

# vLLM's defaults for max_num_batched_tokens by usage context (on hardware it has not tuned for).
DEFAULT_MAX_NUM_BATCHED_TOKENS = {"llm_class": 8192, "openai_api_server": 2048}
# The CPU server steps half as many tokens as vLLM's CPU server (2048): a step of CPU prefill takes
# seconds, and a burst's median time to first token is set by the chunk its prompt lands in. On W1
# served to 32 clients (docs/performance.md) 1024 kept 94-97% of the offline throughput (2048: 97%)
# and cut the median TTFT from 1.85 s to 1.35-1.6 s (two runs).
CPU_SERVER_MAX_NUM_BATCHED_TOKENS = 1024

TRACE_ENV = "PAGEDLLM_TRACE"
# Default KV-cache budget on CPU, in GiB; vLLM's CPU build reads VLLM_CPU_KVCACHE_SPACE.
CPU_KVCACHE_SPACE_ENV = "PAGEDLLM_CPU_KVCACHE_SPACE"
DEFAULT_CPU_KVCACHE_SPACE_GIB = 4.0


def default_max_num_batched_tokens(usage_context: str, device: torch.device) -> int:
    if usage_context == "openai_api_server" and device.type == "cpu":
        return CPU_SERVER_MAX_NUM_BATCHED_TOKENS
    return DEFAULT_MAX_NUM_BATCHED_TOKENS[usage_context]


def cpu_kv_cache_space_bytes() -> int:
    """`$PAGEDLLM_CPU_KVCACHE_SPACE` GiB, else 4 GiB: the CPU cache budget when none is given."""
    raw = os.environ.get(CPU_KVCACHE_SPACE_ENV)
    try:
        gib = float(raw) if raw else DEFAULT_CPU_KVCACHE_SPACE_GIB
    except ValueError as e:
        raise ValueError(f"{CPU_KVCACHE_SPACE_ENV} must be a number of GiB, got {raw!r}") from e
    if gib <= 0:
        raise ValueError(f"{CPU_KVCACHE_SPACE_ENV} must be positive, got {raw!r}")
    return int(gib * (1 << 30))


def arg(default: Any = None, help: str = "", *, flags: tuple[str, ...] = (), choices: Optional[list] = None,
        group: str = "engine", cli: bool = True, default_factory: Any = None) -> Any:
    """A field of `EngineArgs` with what its command-line flag needs: help, spellings, choices."""
    metadata = {"help": help, "flags": flags, "choices": choices, "group": group, "cli": cli}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class EngineArgs:
    model: Optional[str] = arg(
        None, "a local Hugging Face checkpoint directory, a .gguf file, a known short name, or a Hugging Face hub "
              "id (default: the embedded SmolLM2-135M-Instruct)")
    tokenizer: Optional[str] = arg(None, "tokenizer path (default: the model's)")
    trust_remote_code: bool = arg(False, "let transformers run code the checkpoint ships for its config and tokenizer")
    runner: str = arg("auto", "'generate' (text) or 'pooling' (embeddings, classification, scores); 'auto' picks "
                              "from the checkpoint's architecture", choices=["auto", "generate", "pooling"])
    convert: str = arg("auto", "adapt a checkpoint to the pooling runner: 'embed' pools a generator's last hidden "
                               "state into an embedding ('auto': embed for a generator run with --runner pooling)",
                       choices=["auto", "none", "embed", "classify"])
    task: str = arg("auto", "vLLM's older spelling of runner/convert: 'embed', 'classify', 'score' or 'generate'",
                    choices=["auto", "generate", "embed", "embedding", "classify", "score"])
    dtype: str = arg("auto", "weight dtype, and the KV cache's unless --kv-cache-dtype says otherwise ('auto': "
                             "float32 on CPU, the checkpoint's on GPU)",
                     choices=["auto", "float32", "bfloat16", "float16", "float", "half"])
    device: str = arg("auto", "where the model runs ('auto': CUDA when a GPU is present)", choices=["auto", "cpu", "cuda"])
    seed: int = arg(0, "engine seed for unseeded random sampling")
    max_model_len: Optional[int] = arg(None, "context length, prompt + output (default: the model's)")
    max_num_seqs: int = arg(256, "most sequences running at once")
    max_num_batched_tokens: Optional[int] = arg(
        None, "token budget of one engine step (default: 8192 offline; for serve 2048 on GPU, as vLLM, and 1024 on CPU)")
    enable_chunked_prefill: bool = arg(True, "split prompts longer than a step's token budget over several steps")
    block_size: int = arg(16, "tokens per KV-cache block")
    kv_cache_dtype: str = arg("auto", "KV-cache storage dtype ('auto': the model's; 'bfloat16' halves a float32 cache, "
                                      "the bytes decode attention reads; 'fp8' (= 'fp8_e4m3') and 'fp8_e5m2' quarter it)",
                                      choices=list(KV_CACHE_DTYPES))
    quantization: Optional[str] = arg(None, "'int8': W8A8 linear layers on CPU (int8 weights per channel, uint8 "
                                            "activations per token, oneDNN's int8 matmul); changes the numerics, see "
                                            "docs/performance.md. 'gguf': a GGUF's quantised weights kept in their "
                                            "blocks (CPU kernels, docs/quantization.md). 'gptq', 'awq', "
                                            "'compressed-tensors': a checkpoint saved in that format (found from "
                                            "its config when unset; docs/quantization_gptq_awq.md)",
                                            flags=("-q", "--quantization"),
                                      choices=list(QUANTIZATION_METHODS))
    enable_prefix_caching: bool = arg(True, "share the KV blocks of prompts with a common beginning")
    num_gpu_blocks_override: Optional[int] = arg(None, "exact number of KV-cache blocks (any device)")
    kv_cache_memory_bytes: Optional[int] = arg(
        None, f"KV-cache budget in bytes (CPU default: ${CPU_KVCACHE_SPACE_ENV} GiB, else 4; GPU default: what "
              "--gpu-memory-utilization leaves after a profiling pass)")
    gpu_memory_utilization: float = arg(0.9, "share of the GPU's memory the engine may use")
    enforce_eager: bool = arg(False, "no CUDA graphs (and no torch.compile by default)")
    compile_fused_ops: Optional[bool] = arg(
        None, "torch.compile RMSNorm + residual, SiLU-and-mul and rotary (default: on CUDA unless --enforce-eager, "
              "off on CPU, where it gains ~2% and costs start-up compile time)")
    max_logprobs: int = arg(20, "most logprobs / prompt_logprobs a request may ask for (-1: no limit)")
    generation_config: str = arg("auto", "where sampling defaults come from: 'auto' (the model's "
                                         "generation_config.json), 'vllm' (none), or a folder holding one")
    structured_outputs_backend: str = arg(
        "auto", "grammar engine for structured outputs (JSON schemas, regexes, choices, grammars): 'auto' and "
                "'xgrammar' both mean xgrammar, the only one pagedllm has", choices=["auto", "xgrammar"])
    disable_log_stats: bool = arg(False, "no periodic throughput and KV-cache log line")
    trace: bool = arg(
        help="log every scheduler decision about each request (admitted with N cached blocks, chunk of N tokens, "
             "preempted, resumed, finished) and the blocks it was given or released, under the pagedllm.trace "
             f"logger (default: ${TRACE_ENV})",
        default_factory=lambda: env_flag(TRACE_ENV, default=False))
    tensor_parallel_size: int = arg(1, "split every layer over this many workers (processes, one device each)",
                                    flags=("-tp", "--tensor-parallel-size"), group="parallelism")
    pipeline_parallel_size: int = arg(
        1, "split the layers into this many stages, one worker process each (x -tp), that work on successive "
           "batches at once; stage sizes from $PAGEDLLM_PP_LAYER_PARTITION (e.g. '5,3'), else even",
        flags=("-pp", "--pipeline-parallel-size"), group="parallelism")
    data_parallel_size: int = arg(
        1, "engine replicas, each with its own engine core and KV cache (and its own -tp workers); the server sends "
           "each request to the replica with the fewest in flight (serve only)",
        flags=("-dp", "--data-parallel-size"), group="parallelism")
    distributed_executor_backend: Optional[str] = arg(
        None, "who starts the workers (and, for serve, the replicas): 'mp' (processes on this machine, the default "
              "for -tp > 1), 'ray' (actors on the Ray cluster this machine is part of, or a local one), 'uni' (this "
              "process; -tp 1 only)", choices=["mp", "ray", "uni"], group="parallelism")
    enable_expert_parallel: bool = arg(
        False, "mixture-of-experts models: place whole experts on the -tp workers instead of splitting every "
               "expert's intermediate dimension over them", flags=("-ep", "--enable-expert-parallel"),
        group="parallelism")
    limit_mm_per_prompt: Optional[Any] = arg(
        None, 'most images per prompt of a vision-language model, as JSON: \'{"image": 2}\' (default: 999)',
        group="multimodal")
    allowed_media_domains: Optional[Any] = arg(
        None, "hosts whose http(s) image URLs may be fetched, comma-separated (default: none; data URLs only)",
        group="multimodal")
    enable_lora: bool = arg(False, "serve LoRA adapters of the base model (PEFT format), many in one batch",
                            group="lora")
    max_loras: int = arg(1, "most distinct LoRA adapters in one step (the adapter slots of every layer)", group="lora")
    max_lora_rank: int = arg(16, "highest LoRA rank an adapter may have", group="lora")
    max_cpu_loras: Optional[int] = arg(None, "loaded adapters kept in host memory, least recently used evicted "
                                             "first (default: max_loras)", group="lora")
    speculative_config: Optional[dict] = arg(
        None, "speculative decoding, as JSON with vLLM's keys, e.g. '{\"method\": \"ngram\", "
              "\"num_speculative_tokens\": 4, \"prompt_lookup_max\": 4}' (docs/speculative_decoding.md)",
        group="speculative decoding")
    # Who drives the engine, as vLLM's UsageContext: it picks the default step budget when
    # max_num_batched_tokens is not given (offline throughput wants big steps; a server wants
    # small ones, so a burst of prompts is chunked and the first ones start decoding sooner).
    usage_context: str = arg("llm_class", cli=False)

    def __post_init__(self) -> None:
        if self.usage_context not in DEFAULT_MAX_NUM_BATCHED_TOKENS:
            raise ValueError(f"usage_context must be one of {sorted(DEFAULT_MAX_NUM_BATCHED_TOKENS)}, "
                             f"got {self.usage_context!r}")
        SpeculativeConfig.from_dict(self.speculative_config)  # refused before any model is resolved or loaded

    # ----- from LLM(**kwargs) and from the command line ------------------------------------
    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "EngineArgs":
        """`LLM(...)`'s keywords: vLLM-only arguments checked (`VLLM_ONLY_ARGS`), the rest ours;
        a name neither knows is a `TypeError`."""
        for name in [n for n in kwargs if n in VLLM_ONLY_ARGS]:
            VLLM_ONLY_ARGS[name].check(name, kwargs.pop(name))
        return cls(**kwargs)

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser, model_positional: bool = False) -> argparse.ArgumentParser:
        """One flag per field (`--max-model-len`, ...), in an 'engine' and a 'parallelism' group.
        Flags default to None, meaning "not given": the field's own default then applies."""
        groups: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            meta = f.metadata
            if not meta.get("cli", False):
                continue
            group = groups.get(meta["group"]) or groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
            if f.name == "model" and model_positional:
                group.add_argument("model_tag", nargs="?", default=None, metavar="MODEL", help=meta["help"])
            flags = meta["flags"] or ("--" + f.name.replace("_", "-"),)
            default = f.default if f.default is not dataclasses.MISSING else None
            help_text = meta["help"] + (f" (default: {default})" if default not in (None, "") else "")
            kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": help_text}
            if _is_bool(f):
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["type"] = _value_type(f)
                if meta["choices"]:
                    kwargs["choices"] = meta["choices"]
            group.add_argument(*flags, **kwargs)
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace, **overrides: Any) -> "EngineArgs":
        """The flags that were given (a positional MODEL wins over --model), on top of the defaults."""
        names = {f.name for f in dataclasses.fields(cls) if f.metadata.get("cli", False)}
        kwargs = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
        if getattr(args, "model_tag", None):
            kwargs["model"] = args.model_tag
        return cls(**{**kwargs, **overrides})

    # ----- to configs ------------------------------------------------------------------------
    def create_engine_config(self) -> EngineConfig:
        """Resolve the model (fetching a known short name), read its config, and build the engine's
        configs, each validated once with a clear `ValueError`."""
        from pagedllm.model_executor.kv_cache_groups import kv_cache_groups_for
        from pagedllm.model_executor.layers.quantization import resolve_quantization, verify_quantization
        from pagedllm.model_executor.layers.quantization.checkpoint import resolve_checkpoint_quantization
        from pagedllm.model_executor.model_source import resolve_model
        from pagedllm.model_executor.pooling_config import resolve_runner

        resolved = resolve_model(self.model)
        logger.info("Model %s resolved to %s (%s)", resolved.name, resolved.path, resolved.kind)
        model_path = resolved.path
        hf_config = load_hf_config(model_path, self.trust_remote_code)
        runner = resolve_runner(hf_config, model_path, self.runner, self.convert, self.task)
        device = resolve_device(self.device)
        parallel_config = ParallelConfig(
            tensor_parallel_size=self.tensor_parallel_size,
            data_parallel_size=self.data_parallel_size,
            distributed_executor_backend=self.distributed_executor_backend,
            pipeline_parallel_size=self.pipeline_parallel_size,
            pp_layer_partition=(parse_pp_layer_partition(os.environ.get(PP_LAYER_PARTITION_ENV))
                                if self.pipeline_parallel_size > 1 else None),
            enable_expert_parallel=self.enable_expert_parallel,
        )
        parallel_config.verify_with_model(hf_config, device, runner.runner_type)
        if self.pipeline_parallel_size > 1 and self.enable_lora:
            raise ValueError("enable_lora with pipeline_parallel_size > 1 is not supported yet: the adapters are "
                             "loaded for every layer, a stage holds only its own")
        text_config = text_config_of(hf_config)  # a vision-language model's language model
        if self.pipeline_parallel_size > 1 and any(g.sliding_window is not None
                                                   for g in kv_cache_groups_for(text_config)):
            raise ValueError("pipeline_parallel_size > 1 with sliding-window (local) layers is not supported yet: "
                             "their separate block tables are not split by stage")
        max_pos = getattr(text_config, "max_position_embeddings", None) or 2048
        if runner.max_seq_length and self.max_model_len is None:
            max_pos = min(max_pos, runner.max_seq_length)  # what sentence-transformers truncates to, as vLLM
        max_model_len = self.max_model_len or max_pos
        if max_model_len > max_pos:
            raise ValueError(
                f"max_model_len ({max_model_len}) is larger than the model's maximum context ({max_pos})"
            )
        if max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {max_model_len}")
        default_batched = default_max_num_batched_tokens(self.usage_context, device)
        batched = self.max_num_batched_tokens or max(default_batched, self.max_num_seqs)
        pooling = runner.runner_type == "pooling"
        if (not self.enable_chunked_prefill or pooling) and self.max_num_batched_tokens is None:
            batched = max(batched, max_model_len)
        if pooling and self.enable_lora:
            raise ValueError("enable_lora serves adapters of generative models; it cannot be used with "
                             "runner='pooling'")
        num_experts = getattr(hf_config, "num_local_experts", None) or getattr(hf_config, "num_experts", None)
        if self.enable_lora and num_experts:
            raise ValueError("enable_lora is not implemented for mixture-of-experts models (adapters of the experts "
                             "have no LoRA path yet)")
        if pooling and batched < max_model_len:
            raise ValueError(f"max_num_batched_tokens ({batched}) is smaller than max_model_len ({max_model_len}): "
                             "a pooling request runs its whole prompt in one step")
        # transformers >= 4.56 calls it `dtype` and warns on every read of the old `torch_dtype`.
        config_dtype = hf_config.dtype if hasattr(hf_config, "dtype") else getattr(hf_config, "torch_dtype", None)
        quantization, quant_config = resolve_checkpoint_quantization(
            resolve_quantization(self.quantization, model_path), hf_config, model_path)
        model_config = ModelConfig(
            model=model_path,
            tokenizer=self.tokenizer or model_path,
            hf_config=hf_config,
            dtype=resolve_dtype(self.dtype, config_dtype, device),
            max_model_len=max_model_len,
            vocab_size=text_config.vocab_size,
            seed=self.seed,
            enforce_eager=self.enforce_eager,
            compile_fused_ops=(self.compile_fused_ops if self.compile_fused_ops is not None
                               else device.type == "cuda" and not self.enforce_eager),
            quantization=quantization,
            quant_config=quant_config,
            max_logprobs=self.max_logprobs,
            generation_config=self._generation_config_folder(model_path),
            trust_remote_code=self.trust_remote_code,
            runner_type=runner.runner_type,
            pooler_config=runner.pooler_config,
            limit_mm_per_prompt=_parse_json_dict(self.limit_mm_per_prompt, "limit_mm_per_prompt"),
            allowed_media_domains=_parse_domains(self.allowed_media_domains),
        )
        verify_quantization(model_config.quantization, device, model_config.dtype)
        kv_cache_memory_bytes = self.kv_cache_memory_bytes
        num_blocks_override = self.num_gpu_blocks_override
        if runner.encoder_only and num_blocks_override is None:
            # An encoder keeps no K/V between steps (its runner allocates no cache); the scheduler still
            # counts blocks, enough for one full step of max_num_seqs prompts.
            num_blocks_override = -(-max(batched, max_model_len) // self.block_size) + self.max_num_seqs
        if kv_cache_memory_bytes is None and device.type == "cpu" and num_blocks_override is None:
            kv_cache_memory_bytes = cpu_kv_cache_space_bytes()
        return EngineConfig(
            model_config=model_config,
            cache_config=CacheConfig(
                block_size=self.block_size,
                # A pooling request needs every prompt position's hidden state (mean pooling, an encoder's
                # bidirectional attention): no prefix is skipped, as in vLLM for these models.
                enable_prefix_caching=self.enable_prefix_caching and not pooling,
                num_gpu_blocks_override=num_blocks_override,
                kv_cache_memory_bytes=kv_cache_memory_bytes,
                gpu_memory_utilization=self.gpu_memory_utilization,
                cache_dtype=self.kv_cache_dtype,
            ),
            scheduler_config=SchedulerConfig(
                max_num_seqs=self.max_num_seqs,
                max_num_batched_tokens=batched,
                max_model_len=max_model_len,
                enable_chunked_prefill=self.enable_chunked_prefill,
                trace=self.trace,
            ),
            device=device,
            parallel_config=parallel_config,
            structured_outputs_backend=self.structured_outputs_backend,
            lora_config=LoRAConfig(self.max_loras, self.max_lora_rank, self.max_cpu_loras) if self.enable_lora else None,
            speculative_config=self._speculative_config(pooling, model_config),
        )

    def _speculative_config(self, pooling: bool, target: ModelConfig) -> Optional[SpeculativeConfig]:
        spec = SpeculativeConfig.from_dict(self.speculative_config)
        if spec is not None and pooling:
            raise ValueError("speculative_config speeds up generation; it cannot be used with runner='pooling'")
        if spec is not None:  # combinations not built yet, refused rather than run wrong
            from pagedllm.model_executor.kv_cache_groups import kv_cache_groups_for

            if self.pipeline_parallel_size > 1:
                raise ValueError("speculative_config with pipeline_parallel_size > 1 is not supported yet")
            if target.is_multimodal:
                raise ValueError("speculative_config with a vision-language model is not supported yet")
            if any(g.sliding_window is not None for g in kv_cache_groups_for(target.text_config)):
                raise ValueError("speculative_config with sliding-window (local) layers is not supported yet: "
                                 "their KV-cache groups do not release rejected drafts' blocks")
        if spec is None or spec.method not in ("draft_model", "eagle"):
            return spec
        if self.tensor_parallel_size > 1:
            raise ValueError(f"speculative_config method {spec.method!r} runs with tensor_parallel_size=1 only")
        from pagedllm.model_executor.model_source import resolve_model

        path = resolve_model(spec.model).path
        if spec.method == "eagle":
            from pagedllm.model_executor.models.eagle import load_eagle_config

            head = load_eagle_config(path, target.text_config)
            return dataclasses.replace(spec, draft_model_config=ModelConfig(
                model=path, tokenizer=target.tokenizer, hf_config=head, dtype=target.dtype,
                max_model_len=target.max_model_len, vocab_size=head.vocab_size, seed=target.seed,
                enforce_eager=target.enforce_eager))
        hf_config = load_hf_config(path, self.trust_remote_code)
        if hf_config.vocab_size != target.vocab_size:
            raise ValueError(f"speculative_config model {spec.model!r} has a vocabulary of {hf_config.vocab_size} "
                             f"tokens, the target {target.vocab_size}: a draft model must share the tokenizer")
        max_pos = getattr(hf_config, "max_position_embeddings", None) or 2048
        if max_pos < target.max_model_len:
            raise ValueError(f"speculative_config model {spec.model!r} handles {max_pos} positions, fewer than "
                             f"max_model_len ({target.max_model_len})")
        draft = ModelConfig(model=path, tokenizer=target.tokenizer, hf_config=hf_config, dtype=target.dtype,
                            max_model_len=target.max_model_len, vocab_size=hf_config.vocab_size, seed=target.seed,
                            enforce_eager=target.enforce_eager, trust_remote_code=self.trust_remote_code)
        return dataclasses.replace(spec, draft_model_config=draft)

    def _generation_config_folder(self, model_path: str) -> Optional[str]:
        if self.generation_config == "vllm":
            return None
        if self.generation_config == "auto":
            return model_path if os.path.isdir(model_path) else None
        if not os.path.isdir(self.generation_config):
            raise ValueError(f"generation_config must be 'auto', 'vllm' or a folder, got {self.generation_config!r}")
        return self.generation_config


def load_hf_config(model_path: str, trust_remote_code: bool = False) -> Any:
    """The checkpoint's transformers config (from config.json, or from a GGUF's metadata)."""
    from pagedllm.model_executor.gguf_loader import is_gguf_file, load_gguf_config

    if is_gguf_file(model_path):
        return load_gguf_config(model_path)
    from transformers import AutoConfig

    if not os.path.isfile(os.path.join(model_path, "config.json")):
        raise ValueError(f"{model_path} is not a Hugging Face checkpoint directory (no config.json)")
    return AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)


def _is_bool(f: dataclasses.Field) -> bool:
    return f.type in ("bool", "Optional[bool]", bool)


def _parse_json_dict(value: Any, name: str) -> Optional[dict]:
    """A dict given as such (offline) or as JSON (the command line)."""
    if value is None or isinstance(value, dict):
        return value or None
    try:
        parsed = json.loads(value)
    except (TypeError, json.JSONDecodeError):
        parsed = None
    if not isinstance(parsed, dict):
        raise ValueError(f"{name} must be a JSON object such as '{{\"image\": 2}}', got {value!r}")
    return parsed


def _parse_domains(value: Any) -> tuple[str, ...]:
    """Host names from a list (offline) or a comma- or space-separated string (the command line)."""
    if not value:
        return ()
    items = value.replace(",", " ").split() if isinstance(value, str) else list(value)
    if not all(isinstance(d, str) and d for d in items):
        raise ValueError(f"allowed_media_domains must be host names, got {value!r}")
    return tuple(items)


def _value_type(f: dataclasses.Field) -> Any:
    if f.type == "Optional[dict]":
        return _json_object
    for name, kind in (("int", int), ("float", float)):
        if f.type in (name, f"Optional[{name}]"):
            return kind
    return str


def _json_object(text: str) -> dict:
    """A flag whose value is a JSON object (vLLM's `--speculative-config '{...}'`)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text!r}") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


# ----- vLLM's arguments that pagedllm does not implement (yet) -------------------------------------
@dataclass(frozen=True)
class VllmOnlyArg:
    """A vLLM engine argument with no pagedllm implementation: `accepted` are the values that ask
    for nothing pagedllm lacks (vLLM's default among them)."""

    accepted: tuple
    feature: str

    def check(self, name: str, value: Any) -> None:
        if value in self.accepted or (value is None and None in self.accepted) or (
                isinstance(value, (dict, list, set)) and not value and {} in self.accepted):
            return
        raise NotImplementedError(f"{name}={value!r} is not supported by pagedllm yet ({self.feature}); "
                                  f"leave it at {self.accepted[0]!r}")


_LORA = "LoRA adapters"
_SPEC = "speculative decoding"
_HUB = "options of the Hugging Face hub download"
_MM = "image, audio and video inputs"
VLLM_ONLY_ARGS: dict[str, VllmOnlyArg] = {
    "fully_sharded_loras": VllmOnlyArg((False,), _LORA),
    "lora_dtype": VllmOnlyArg(("auto",), _LORA),
    "spec_method": VllmOnlyArg((None,), _SPEC),
    "spec_model": VllmOnlyArg((None,), _SPEC),
    "spec_tokens": VllmOnlyArg((None,), _SPEC),
    "cpu_offload_gb": VllmOnlyArg((0,), "offloading weights to CPU memory"),
    "structured_outputs_config": VllmOnlyArg((None, {}), "structured outputs"),
    "reasoning_parser": VllmOnlyArg((None, ""), "reasoning parsers"),
    "mm_processor_kwargs": VllmOnlyArg((None, {}), _MM),
    "enable_prompt_embeds": VllmOnlyArg((False,), "prompt embeddings"),
    "revision": VllmOnlyArg((None,), _HUB),
    "tokenizer_revision": VllmOnlyArg((None,), _HUB),
    "code_revision": VllmOnlyArg((None,), _HUB),
    "download_dir": VllmOnlyArg((None,), _HUB),
    "hf_token": VllmOnlyArg((None,), _HUB),
    "hf_overrides": VllmOnlyArg((None, {}), "overriding the checkpoint's config"),
    "tokenizer_mode": VllmOnlyArg(("auto", "hf"), "tokenizers other than Hugging Face's"),
    "skip_tokenizer_init": VllmOnlyArg((False,), "running without a tokenizer"),
    "load_format": VllmOnlyArg(("auto",), "load formats other than safetensors and GGUF, picked from the files"),
    "compilation_config": VllmOnlyArg((None, {}), "vLLM's compilation config (see compile_fused_ops)"),
    "kv_transfer_config": VllmOnlyArg((None,), "disaggregated prefill"),
    "scheduling_policy": VllmOnlyArg(("fcfs",), "priority scheduling"),
    "async_scheduling": VllmOnlyArg((None, False), "asynchronous scheduling"),
    "enable_sleep_mode": VllmOnlyArg((False,), "sleep mode"),
    "logits_processors": VllmOnlyArg((None, []), "custom logits processors"),
    "override_generation_config": VllmOnlyArg((None, {}), "overriding the generation config"),
    # pagedllm has no custom all-reduce to disable: either value gets exactly what it asks for.
    "disable_custom_all_reduce": VllmOnlyArg((False, True), "custom all-reduce"),
}
