"""`pagedllm serve [MODEL]`: the OpenAI-compatible server, with vLLM's flag names."""

from __future__ import annotations

import argparse
import os

from pagedllm.engine.arg_utils import EngineArgs
from pagedllm.entrypoints.openai.limits import add_limit_args
from pagedllm.entrypoints.openai.tool_parsers import ToolParserManager
from pagedllm.reasoning import ReasoningParserManager
from pagedllm.utils import env_flag

# POST /v1/load_lora_adapter and /v1/unload_lora_adapter are served only when one of these is true.
RUNTIME_LORA_ENV = "PAGEDLLM_ALLOW_RUNTIME_LORA_UPDATING"
VLLM_RUNTIME_LORA_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"


def run_serve(args: argparse.Namespace) -> int:
    # Imported here so that `pagedllm generate` never pays for the web stack.
    from pagedllm.engine.async_llm import AsyncLLM
    from pagedllm.entrypoints.openai.api_server import (
        ServerSettings,
        bind_socket,
        load_chat_template,
        parse_allowed_origins,
        serve,
    )
    from pagedllm.entrypoints.openai.limits import limits_from_args
    from pagedllm.entrypoints.openai.serving_models import parse_lora_modules
    from pagedllm.model_executor.model_source import resolve_model

    if args.shutdown_timeout < 0:
        raise ValueError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    if args.enable_auto_tool_choice and not args.tool_call_parser:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser")
    engine_args = EngineArgs.from_cli_args(args, usage_context="openai_api_server")
    settings_kwargs = dict(
        api_key=args.api_key or os.environ.get("PAGEDLLM_API_KEY") or None,
        allowed_origins=parse_allowed_origins(args.allowed_origins),
        chat_template=load_chat_template(args.chat_template),
        trust_request_chat_template=args.trust_request_chat_template,
        enable_auto_tool_choice=args.enable_auto_tool_choice,
        tool_call_parser=args.tool_call_parser,
        reasoning_parser=args.reasoning_parser,
        limits=limits_from_args(args),
        lora_modules=parse_lora_modules(args.lora_modules),
        allow_runtime_lora_updating=env_flag(RUNTIME_LORA_ENV, default=False) or env_flag(VLLM_RUNTIME_LORA_ENV,
                                                                                           default=False),
    )
    if (settings_kwargs["lora_modules"] or settings_kwargs["allow_runtime_lora_updating"]) and not engine_args.enable_lora:
        raise ValueError("--lora-modules and runtime LoRA updating need --enable-lora")
    sock = bind_socket(args.host, args.port)
    resolved = resolve_model(engine_args.model)  # its name is what the server answers to
    engine_args.model = resolved.path
    engine = AsyncLLM.from_engine_args(engine_args, engine_process=args.engine_core == "process")
    settings = ServerSettings(served_model_names=args.served_model_name or [resolved.name], model_root=resolved.path,
                              **settings_kwargs)
    started = serve(engine, settings, sock, log_level=args.uvicorn_log_level, shutdown_timeout=args.shutdown_timeout,
                    access_log=not args.disable_uvicorn_access_log)
    return 0 if started else 1


def add_serve_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="start the OpenAI-compatible HTTP server",
        description="Serve a model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
                    "/v1/models, /tokenize, /detokenize, /health, /metrics, /version). See inside the engine "
                    "while it runs: /dashboard (a live page of the KV cache, the queues and the last minutes' "
                    "throughput; with --api-key open /dashboard#api_key=KEY) and /v1/engine/state (its data as "
                    "JSON). --trace logs each request's path through the scheduler and the KV cache.",
    )
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; use 0.0.0.0 to accept "
                        "connections from other machines)")
    g.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    g.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="the model name(s) clients send in `model`; the first is the one responses report "
                        "(default: the MODEL argument)")
    g.add_argument("--api-key", default=None,
                   help="require `Authorization: Bearer <key>` on every route but /health, /metrics, /version "
                        "and the /dashboard page itself (default: $PAGEDLLM_API_KEY, else no key)")
    g.add_argument("--chat-template", default=None,
                   help="a Jinja chat template, or the path of a file holding one (default: the model's)")
    g.add_argument("--trust-request-chat-template", action="store_true",
                   help="render a chat_template sent with a request (default: refused with a 400, since a template "
                        "is code the server runs)")
    g.add_argument("--allowed-origins", default=None,
                   help="CORS origins allowed to call the server from a browser, as a JSON list ('[\"*\"]') or "
                        "comma-separated (default: none)")
    g.add_argument("--uvicorn-log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"])
    g.add_argument("--disable-uvicorn-access-log", action="store_true", help="no log line per HTTP request")
    g.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGINT/SIGTERM, seconds requests in flight may take to finish before they are "
                        "failed (default 30)")
    g.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="with tools and tool_choice 'auto', parse the model's own tool-call format into tool_calls "
                        "(needs --tool-call-parser)")
    g.add_argument("--tool-call-parser", default=None, choices=ToolParserManager.names(),
                   help="the model's tool-call format: hermes (Qwen2.5/Qwen3, Hermes), llama3_json, mistral")
    g.add_argument("--reasoning-parser", default=None, choices=ReasoningParserManager.names(),
                   help="split the model's reasoning (<think>...</think>) into reasoning_content: qwen3, deepseek_r1; "
                        "a structured-output constraint then applies after the reasoning")
    g.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME=PATH",
                   help="LoRA adapters (PEFT folders) to serve, each a model named NAME in /v1/models and the "
                        "requests' model field (needs --enable-lora); with PAGEDLLM_ALLOW_RUNTIME_LORA_UPDATING=1 "
                        "(or vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING) POST /v1/load_lora_adapter and "
                        "/v1/unload_lora_adapter add and remove them while serving")
    g.add_argument("--engine-core", choices=["process", "thread"], default="process",
                   help="where the engine loop runs: a process of its own (default, as in vLLM v1), or a "
                        "background thread of the server process (docs/serving.md has the measurements)")
    add_limit_args(p)
    EngineArgs.add_cli_args(p, model_positional=True)
    p.set_defaults(func=run_serve)
