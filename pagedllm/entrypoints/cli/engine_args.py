"""The engine flags every subcommand shares, spelled as vLLM spells them."""

from __future__ import annotations

import argparse
from typing import Any

from pagedllm.engine.arg_utils import EngineArgs


def add_engine_args(parser: argparse.ArgumentParser, model_positional: bool = False) -> None:
    g = parser.add_argument_group("engine")
    help_model = (
        "a local Hugging Face checkpoint directory, a .gguf file, a known short name, or a Hugging Face "
        "hub id (default: the embedded SmolLM2-135M-Instruct)"
    )
    if model_positional:
        g.add_argument("model_tag", nargs="?", default=None, metavar="MODEL", help=help_model)
    g.add_argument("--model", default=None, help=help_model)
    g.add_argument("--tokenizer", default=None, help="tokenizer path (default: the model's)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weight dtype, and the KV cache's unless --kv-cache-dtype says otherwise ('auto': float32 on "
                        "CPU, the checkpoint's on GPU)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--seed", type=int, default=0, help="engine seed for unseeded random sampling")
    g.add_argument("--max-model-len", type=int, default=None, help="context length (prompt + output)")
    g.add_argument("--max-num-seqs", type=int, default=256, help="most requests running at once")
    g.add_argument("--max-num-batched-tokens", type=int, default=None, help="token budget of one engine step (default: 8192 offline; for serve 2048 on GPU, as vLLM, and "
                        "1024 on CPU)")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    g.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "bfloat16"],
                   help="KV-cache storage dtype ('auto': the model's; 'bfloat16' halves a float32 cache, "
                        "the bytes decode attention reads)")
    g.add_argument("-q", "--quantization", default=None, choices=["int8"],
                   help="'int8': W8A8 linear layers on CPU (int8 weights per channel, uint8 activations per "
                        "token, oneDNN's int8 matmul); changes the numerics, see docs/performance.md")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--num-gpu-blocks-override", type=int, default=None,
                   help="exact number of KV-cache blocks (any device)")
    g.add_argument("--kv-cache-memory-bytes", type=int, default=None,
                   help="KV-cache budget in bytes (CPU default: $PAGEDLLM_CPU_KVCACHE_SPACE GiB, else 4)")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    g.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (and no torch.compile by default)")
    g.add_argument("--compile-fused-ops", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile RMSNorm + residual, SiLU-and-mul and rotary (default: on CUDA unless "
                        "--enforce-eager, off on CPU)")
    g.add_argument("--trace", action="store_true",
                   help="log every scheduler decision about each request (admitted with N cached blocks, chunk "
                        "of N tokens, preempted, resumed, finished) and the blocks it was given or released, "
                        "under the pagedllm.trace logger; same as PAGEDLLM_TRACE=1")
    p = parser.add_argument_group("parallelism")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="split every layer over this many workers (processes, one device each)")
    p.add_argument("--distributed-executor-backend", choices=["mp", "ray", "uni"], default=None,
                   help="who starts the workers (and, for serve, the replicas): 'mp' (processes on this "
                        "machine, the default for -tp > 1), 'ray' (actors on the Ray cluster this machine is "
                        "part of, or a local one), 'uni' (this process; -tp 1 only)")


def llm_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """`LLM(...)` keyword arguments from parsed flags."""
    model = getattr(args, "model_tag", None) or args.model
    fields = EngineArgs.__dataclass_fields__
    kwargs = {name: getattr(args, name) for name in fields if hasattr(args, name) and name != "model"}
    kwargs["model"] = model
    return kwargs
