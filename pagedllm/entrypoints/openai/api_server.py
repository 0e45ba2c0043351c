"""The OpenAI-compatible HTTP server: a FastAPI app over `AsyncLLM`, run by uvicorn.

Routes: /v1/completions, /v1/chat/completions, /v1/models, /tokenize, /detokenize, /health,
/metrics, /version, and the view inside the engine, /v1/engine/state and /dashboard
(`openai/dashboard.py`). A pooling model (`--runner pooling`) serves /v1/embeddings, /pooling,
/classify, /score and /rerank (`openai/serving_pooling.py`) instead of the generation routes. A request whose client disconnects is cancelled, which aborts it in the
engine. On SIGINT/SIGTERM the server stops accepting connections, lets requests in flight finish
for `--shutdown-timeout` seconds, then fails the rest with a clean 503 (or an error event on a
stream) before the engine stops.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import socket
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, Awaitable, Optional

import uvicorn
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from pagedllm.version import __version__
from pagedllm.engine.async_llm import AsyncLLM
from pagedllm.entrypoints.openai.dashboard import DASHBOARD_PATH, add_dashboard_routes
from pagedllm.engine.input_processor import InvalidRequestError
from pagedllm.entrypoints.openai.errors import OpenAIError, bad_request, install_error_handlers
from pagedllm.entrypoints.openai.metrics import ServerMetrics
from pagedllm.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    LoadLoRAAdapterRequest,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    UnloadLoRAAdapterRequest,
    ignored_fields,
    unsupported_field,
)
from pagedllm.entrypoints.openai.serving_chat import OpenAIServingChat
from pagedllm.entrypoints.openai.serving_completion import OpenAIServingCompletion
from pagedllm.entrypoints.openai.limits import RequestSizeLimitMiddleware, ServerLimits, http_protocol
from pagedllm.entrypoints.openai.pooling_protocol import (
    ClassificationRequest,
    EmbeddingRequest,
    PoolingRequest,
    RerankRequest,
    ScoreRequest,
)
from pagedllm.entrypoints.openai.serving_engine import EnginePrompt, OpenAIServing
from pagedllm.entrypoints.openai.serving_models import OpenAIServingModels
from pagedllm.entrypoints.openai.serving_pooling import OpenAIServingPooling, not_supported
from pagedllm.logger import init_logger

logger = init_logger(__name__)

# Routes anyone may call even when --api-key is set: probes, monitoring, and the dashboard page
# (static: the data it draws comes from /v1/engine/state, which needs the key).
OPEN_PATHS = frozenset({"/health", "/metrics", "/version", DASHBOARD_PATH})


@dataclass
class ServerSettings:
    served_model_names: list[str]
    model_root: str
    api_key: Optional[str] = None
    allowed_origins: list[str] = field(default_factory=list)
    chat_template: Optional[str] = None
    trust_request_chat_template: bool = False
    limits: ServerLimits = field(default_factory=ServerLimits)
    enable_auto_tool_choice: bool = False
    tool_call_parser: Optional[str] = None
    reasoning_parser: Optional[str] = None
    # LoRA adapters served from the start, as (name, PEFT folder) (`--lora-modules name=path`)
    lora_modules: list[tuple[str, str]] = field(default_factory=list)
    # POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING)
    allow_runtime_lora_updating: bool = False


# ----- the app --------------------------------------------------------------------------------
def build_app(engine: AsyncLLM, settings: ServerSettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await engine.start()
        yield
        await engine.shutdown()

    app = FastAPI(title="pagedllm", version=__version__, lifespan=lifespan)
    install_error_handlers(app)
    names = settings.served_model_names
    serving_models = OpenAIServingModels(engine, names, settings.model_root, settings.lora_modules)
    common = dict(served_model_names=names, chat_template=settings.chat_template, limits=settings.limits,
                  trust_request_chat_template=settings.trust_request_chat_template, models=serving_models)
    completions = OpenAIServingCompletion(engine, **common)
    chat = OpenAIServingChat(engine, **common, enable_auto_tool_choice=settings.enable_auto_tool_choice,
                             tool_call_parser=settings.tool_call_parser, reasoning_parser=settings.reasoning_parser)
    tokenization = OpenAIServing(engine, **common)
    pooling = OpenAIServingPooling(engine, **common)
    # Every route answers, but only those this model serves are in /openapi.json: the others are vLLM's 501.
    tasks = pooling.tasks
    generates = "generate" in tasks
    metrics = ServerMetrics(engine, names[0])

    @app.get("/health")
    async def health() -> Response:
        if engine.is_dead:
            return OpenAIError("the engine is not running", 503, code="engine_dead").to_json_response()
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/version")
    async def version() -> Response:
        return JSONResponse({"version": __version__})

    @app.get("/v1/models")
    async def models() -> Response:
        return _json(ModelList(data=serving_models.model_cards()))

    if settings.allow_runtime_lora_updating:
        @app.post("/v1/load_lora_adapter")
        async def load_lora_adapter(request: LoadLoRAAdapterRequest) -> Response:
            try:  # reading the adapter is disk and CPU work: off the event loop
                await OpenAIServing.off_the_event_loop(serving_models.add_lora, request.lora_name, request.lora_path)
            except InvalidRequestError as e:
                raise OpenAIError(str(e), 400, param=e.param) from e
            except ValueError as e:
                raise bad_request(e) from e
            return PlainTextResponse(f"Success: LoRA adapter '{request.lora_name}' added successfully.")

        @app.post("/v1/unload_lora_adapter")
        async def unload_lora_adapter(request: UnloadLoRAAdapterRequest) -> Response:
            serving_models.remove_lora(request.lora_name)
            return PlainTextResponse(f"Success: LoRA adapter '{request.lora_name}' removed successfully.")

    @app.post("/v1/completions", include_in_schema=generates)
    async def create_completion(request: CompletionRequest, raw_request: Request) -> Response:
        if not generates:
            raise not_supported("Completions API")
        _check_extra_fields(request)
        return await _until_disconnected(raw_request, completions.create_completion(request))

    @app.post("/v1/chat/completions", include_in_schema=generates)
    async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request) -> Response:
        if not generates:
            raise not_supported("Chat Completions API")
        _check_extra_fields(request)
        return await _until_disconnected(raw_request, chat.create_chat_completion(request))

    @app.post("/v1/embeddings", include_in_schema="embed" in tasks)
    async def create_embedding(request: EmbeddingRequest, raw_request: Request) -> Response:
        return await _until_disconnected(raw_request, _as_json(pooling.create_embedding(request)))

    @app.post("/pooling", include_in_schema="encode" in tasks)
    async def create_pooling(request: PoolingRequest, raw_request: Request) -> Response:
        return await _until_disconnected(raw_request, _as_json(pooling.create_pooling(request)))

    @app.post("/classify", include_in_schema="classify" in tasks)
    async def create_classify(request: ClassificationRequest, raw_request: Request) -> Response:
        return await _until_disconnected(raw_request, _as_json(pooling.create_classify(request)))

    @app.post("/score", include_in_schema="score" in tasks)
    @app.post("/v1/score", include_in_schema="score" in tasks)
    async def create_score(request: ScoreRequest, raw_request: Request) -> Response:
        return await _until_disconnected(raw_request, _as_json(pooling.create_score(request)))

    @app.post("/rerank", include_in_schema="score" in tasks)
    @app.post("/v1/rerank", include_in_schema="score" in tasks)
    @app.post("/v2/rerank", include_in_schema="score" in tasks)
    async def create_rerank(request: RerankRequest, raw_request: Request) -> Response:
        return await _until_disconnected(raw_request, _as_json(pooling.create_rerank(request)))

    @app.post("/tokenize")
    async def tokenize(request: TokenizeRequest) -> Response:
        tokenization.check_model(request.model)
        if (request.prompt is None) == (request.messages is None):
            raise OpenAIError("give exactly one of prompt or messages", 400, param="prompt")
        ids = (await tokenization.off_the_event_loop(_tokenize, tokenization, request)).token_ids
        strs = tokenization.tokenizer.convert_ids_to_tokens(ids) if request.return_token_strs else None
        return _json(TokenizeResponse(count=len(ids), max_model_len=engine.max_model_len, tokens=ids, token_strs=strs))

    @app.post("/detokenize")
    async def detokenize(request: DetokenizeRequest) -> Response:
        tokenization.check_model(request.model)
        ids = tokenization.from_token_ids(request.tokens, param="tokens").token_ids
        return _json(DetokenizeResponse(prompt=tokenization.tokenizer.decode(ids)))

    add_dashboard_routes(app, engine, names[0])

    # Middleware added last runs first: CORS, then the API key (so that no unauthenticated body is
    # read), then the body limits, then the routes.
    limits = settings.limits
    app.add_middleware(RequestSizeLimitMiddleware, max_bytes=limits.max_request_body_bytes,
                       body_timeout_s=limits.request_body_timeout_s)
    if settings.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=settings.api_key)
    if settings.allowed_origins:  # outermost, so that CORS preflights never meet the API-key check
        app.add_middleware(CORSMiddleware, allow_origins=settings.allowed_origins, allow_methods=["*"],
                           allow_headers=["*"])
    return app


def _tokenize(tokenization: OpenAIServing, request: TokenizeRequest) -> EnginePrompt:
    """/tokenize's work, run off the event loop: the chat template or the prompt, then the tokenizer."""
    if request.messages is not None:
        text, _ = tokenization.render_chat(request.messages, request.add_generation_prompt,
                                           request.continue_final_message, request.chat_template,
                                           request.chat_template_kwargs)
        return tokenization.tokenize(text, bool(request.add_special_tokens))
    return tokenization.tokenize(request.prompt, request.add_special_tokens is not False)


def _json(model: BaseModel) -> Response:
    return Response(model.model_dump_json(), media_type="application/json")


def _check_extra_fields(request: BaseModel) -> None:
    """A 400 for a vLLM field pagedllm cannot honour yet; a log line for fields nobody defines."""
    unsupported = unsupported_field(request)
    if unsupported is not None:
        name, feature = unsupported
        raise OpenAIError(f"{name} is not supported by pagedllm yet ({feature})", 400, param=name)
    ignored = ignored_fields(request)
    if ignored:
        logger.warning("Ignoring unknown request fields: %s", ignored)


async def _until_disconnected(raw_request: Request, handler: Awaitable[Response]) -> Response:
    """Run a handler, cancelling it (and so aborting its engine requests) if the client goes away.

    A streaming handler returns as soon as its response is built; from then on Starlette watches
    the connection and cancels the stream itself.
    """
    task = asyncio.ensure_future(handler)
    watcher = asyncio.ensure_future(_wait_for_disconnect(raw_request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        watcher.cancel()
        raise
    if task.done():
        watcher.cancel()
        return task.result()
    task.cancel()
    with suppress(asyncio.CancelledError, Exception):
        await task
    return Response(status_code=499)  # nobody is listening; nothing is sent


async def _as_json(body: Awaitable[BaseModel]) -> Response:
    return _json(await body)


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class APIKeyMiddleware:
    """401 unless `Authorization: Bearer <key>` matches (compared in constant time); probes stay open."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.api_key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            error = OpenAIError("You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.", 401,
                                code="invalid_api_key")
        elif not hmac.compare_digest(token.strip().encode(), self.api_key):
            error = OpenAIError("Incorrect API key provided.", 401, code="invalid_api_key")
        else:
            return await self.app(scope, receive, send)
        await error.to_json_response()(scope, receive, send)


# ----- running it ------------------------------------------------------------------------------
class _Server(uvicorn.Server):
    """uvicorn's server, plus a deadline for requests still running when shutdown starts."""

    def __init__(self, config: uvicorn.Config, engine: AsyncLLM, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.engine = engine
        self.shutdown_timeout = shutdown_timeout
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    async def startup(self, sockets: Optional[list[socket.socket]] = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: Any) -> None:
        first = not self.should_exit
        super().handle_exit(sig, frame)
        if first and self._loop is not None:
            logger.info("Shutting down: requests in flight get %.0f s to finish", self.shutdown_timeout)
            self._loop.call_soon_threadsafe(self._loop.call_later, self.shutdown_timeout, self.engine.abort_all,
                                            "the server is shutting down")


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind before loading the model, so a taken port fails at once rather than after the load."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise ValueError(f"cannot resolve host {host!r}: {e}") from e
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        # Listening at once claims the port: SO_REUSEADDR lets a second server bind it until this one
        # listens, and that one would then fail only after loading its model. Connections made while
        # the model loads wait in the backlog.
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    sock.set_inheritable(True)
    return sock


def load_chat_template(value: Optional[str]) -> Optional[str]:
    """`--chat-template`: a file's path, or the Jinja template itself (as vLLM accepts both)."""
    if value is None:
        return None
    path = os.path.expanduser(value)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    if any(c in value for c in "{}\n"):
        return value
    raise ValueError(f"--chat-template {value!r} is neither a readable file nor a Jinja template")


def parse_allowed_origins(value: Optional[str]) -> list[str]:
    """`--allowed-origins`: a JSON list as vLLM takes it (`'["*"]'`), or comma-separated origins."""
    if not value:
        return []
    value = value.strip()
    if value.startswith("["):
        try:
            origins = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"--allowed-origins is not a JSON list: {e}") from e
        if not isinstance(origins, list) or not all(isinstance(o, str) for o in origins):
            raise ValueError("--allowed-origins must be a JSON list of strings")
        return origins
    return [o.strip() for o in value.split(",") if o.strip()]


def serve(engine: AsyncLLM, settings: ServerSettings, sock: socket.socket, log_level: str = "info",
          shutdown_timeout: float = 30.0, access_log: bool = True) -> bool:
    """Serve until told to stop; False if the HTTP server never started (uvicorn's log says why)."""
    app = build_app(engine, settings)
    config = uvicorn.Config(app, log_level=log_level, access_log=access_log,
                            timeout_graceful_shutdown=shutdown_timeout + 10, timeout_keep_alive=5,
                            http=http_protocol(settings.limits.request_head_timeout_s))
    server = _Server(config, engine, shutdown_timeout)
    host, port = sock.getsockname()[:2]
    logger.info("Serving %s on http://%s:%d (OpenAI-compatible API under /v1)",
                ", ".join(settings.served_model_names), host, port)
    try:
        server.run(sockets=[sock])
    finally:
        engine.close()  # whatever stopped the server, no engine process is left behind
    return server.started
