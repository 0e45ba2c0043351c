"""`pagedllm serve [MODEL]`: the OpenAI-compatible server, with vLLM's flag names."""

from __future__ import annotations

import argparse
import os

from pagedllm.entrypoints.cli.engine_args import add_engine_args, llm_kwargs


def run_serve(args: argparse.Namespace) -> int:
    # Imported here so that `pagedllm generate` never pays for the web stack.
    from pagedllm.engine.arg_utils import EngineArgs
    from pagedllm.engine.async_llm import AsyncLLM
    from pagedllm.entrypoints.openai.api_server import (
        ServerSettings,
        bind_socket,
        load_chat_template,
        parse_allowed_origins,
        serve,
    )
    from pagedllm.logger import init_logger
    from pagedllm.model_executor.model_source import resolve_model

    logger = init_logger("pagedllm.entrypoints.cli.serve")
    if args.max_logprobs < 0:
        raise ValueError(f"--max-logprobs must be >= 0, got {args.max_logprobs}")
    if args.shutdown_timeout < 0:
        raise ValueError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    if args.data_parallel_size < 1:
        raise ValueError(f"--data-parallel-size must be >= 1, got {args.data_parallel_size}")
    kwargs = llm_kwargs(args)
    settings_kwargs = dict(
        api_key=args.api_key or os.environ.get("PAGEDLLM_API_KEY") or None,
        allowed_origins=parse_allowed_origins(args.allowed_origins),
        chat_template=load_chat_template(args.chat_template),
        max_logprobs=args.max_logprobs,
    )
    sock = bind_socket(args.host, args.port)
    resolved = resolve_model(kwargs["model"])
    logger.info("Model %s resolved to %s (%s)", resolved.name, resolved.path, resolved.kind)
    engine = AsyncLLM(EngineArgs(**kwargs, usage_context="openai_api_server"), resolved.path, engine_process=args.engine_core == "process")
    settings = ServerSettings(served_model_names=args.served_model_name or [resolved.name], model_root=resolved.path,
                              **settings_kwargs)
    serve(engine, settings, sock, log_level=args.uvicorn_log_level, shutdown_timeout=args.shutdown_timeout,
          access_log=not args.disable_uvicorn_access_log)
    return 0


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
    g.add_argument("--allowed-origins", default=None,
                   help="CORS origins allowed to call the server from a browser, as a JSON list ('[\"*\"]') or "
                        "comma-separated (default: none)")
    g.add_argument("--uvicorn-log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"])
    g.add_argument("--disable-uvicorn-access-log", action="store_true", help="no log line per HTTP request")
    g.add_argument("--max-logprobs", type=int, default=20,
                   help="most logprobs / top_logprobs / prompt_logprobs a request may ask for (default 20)")
    g.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGINT/SIGTERM, seconds requests in flight may take to finish before they are "
                        "failed (default 30)")
    g.add_argument("--engine-core", choices=["process", "thread"], default="process",
                   help="where the engine loop runs: a process of its own (default, as in vLLM v1), or a "
                        "background thread of the server process (docs/serving.md has the measurements)")
    g.add_argument("--data-parallel-size", "-dp", type=int, default=1,
                   help="engine replicas, each with its own engine core and KV cache (and its own -tp workers); "
                        "requests go to the replica with the fewest in flight")
    add_engine_args(p, model_positional=True)
    p.set_defaults(func=run_serve)
