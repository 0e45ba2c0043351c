"""How much work one request may ask of the server, and the checks that hold it to that.

A server shared by many clients must not let one request slow or stop the others. Bytes are bounded
before the body is read (`RequestSizeLimitMiddleware`: a 413, checked on the declared length and
again while a body without one streams in, and a 408 for a body not whole in time); work is bounded once
the body is parsed (`check_request_limits`: prompts per request, sequences per request, stop
strings). Every limit is a `pagedllm serve` flag; `docs/serving.md` lists them with their defaults
and what a client sees when it hits one.
"""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pagedllm.entrypoints.openai.errors import OpenAIError


@dataclass(frozen=True)
class ServerLimits:
    # The largest request body read: a 32 MiB JSON parses in well under a second, and a chat with a 20 MB
    # image (27 MB as base64) still reaches the image checks, which answer it with a 400 naming the limit.
    max_request_body_bytes: int = 32 << 20
    # A connection that has not sent a whole request line and headers this long after connecting (or
    # after its previous response) is closed, so idle or trickling clients hold no connection for good.
    request_head_timeout_s: float = 10.0
    # A body not whole this long after its head is cut off (408): a client trickling bytes, or one
    # that stalled, holds nothing for longer.
    request_body_timeout_s: float = 30.0
    # vLLM's limit on a completions prompt list (VLLM_MAX_COMPLETION_PROMPTS).
    max_prompts_per_request: int = 1024
    # Prompts x n: the sequences one request adds to the engine.
    max_sequences_per_request: int = 1024
    max_stop_strings: int = 16
    max_stop_string_length: int = 1024

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")


def add_limit_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("request limits")
    defaults = ServerLimits()
    helps = {
        "max_request_body_bytes": "largest request body in bytes; a larger one gets a 413",
        "request_head_timeout_s": "seconds a connection may take to send a request's line and headers before it is "
                                  "closed",
        "request_body_timeout_s": "seconds a request body may take to arrive, whole, before the server gives up on it (408)",
        "max_prompts_per_request": "most prompts in one completions request",
        "max_sequences_per_request": "most sequences one request may start: prompts x n",
        "max_stop_strings": "most stop strings in one request",
        "max_stop_string_length": "longest stop string, in characters",
    }
    for name, text in helps.items():
        default = getattr(defaults, name)
        g.add_argument("--" + name.replace("_", "-"), type=type(default), default=default,
                       help=f"{text} (default {default})")


def limits_from_args(args: argparse.Namespace) -> ServerLimits:
    return ServerLimits(**{name: getattr(args, name) for name in vars(ServerLimits())})


def check_request_limits(limits: ServerLimits, request: Any, num_prompts: int) -> None:
    """A 400 naming the field when a parsed request asks for more work than one request may."""
    if num_prompts > limits.max_prompts_per_request:
        raise OpenAIError(f"at most {limits.max_prompts_per_request} prompts per request, got {num_prompts} "
                          "(--max-prompts-per-request)", 400, param="prompt")
    n = getattr(request, "n", 1) or 1
    if num_prompts * n > limits.max_sequences_per_request:
        raise OpenAIError(f"this request would start {num_prompts * n} sequences (prompts x n); at most "
                          f"{limits.max_sequences_per_request} per request (--max-sequences-per-request)", 400,
                          param="n")
    stop = getattr(request, "stop", None)
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > limits.max_stop_strings:
        raise OpenAIError(f"at most {limits.max_stop_strings} stop strings, got {len(stops)} (--max-stop-strings)",
                          400, param="stop")
    if any(isinstance(s, str) and len(s) > limits.max_stop_string_length for s in stops):
        raise OpenAIError(f"a stop string may be at most {limits.max_stop_string_length} characters "
                          "(--max-stop-string-length)", 400, param="stop")


def http_protocol(head_timeout_s: float) -> type:
    """uvicorn's h11 protocol with a deadline on a request's head (see `ServerLimits`); uvicorn's own
    keep-alive timer stops at the first byte, so a client sending headers a byte at a time would
    otherwise hold its connection forever."""
    from uvicorn.protocols.http.h11_impl import H11Protocol, h11

    class HeadDeadlineH11Protocol(H11Protocol):
        _head_deadline: Any = None

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_head_deadline()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE and self._head_deadline is not None:
                self._head_deadline.cancel()  # the head is in: the body has its own timeout
                self._head_deadline = None

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_head_deadline()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._head_deadline is not None:
                self._head_deadline.cancel()
            super().connection_lost(exc)

        def _arm_head_deadline(self) -> None:
            if self._head_deadline is not None:
                self._head_deadline.cancel()
            self._head_deadline = self.loop.call_later(head_timeout_s, self._head_timed_out)

        def _head_timed_out(self) -> None:
            self._head_deadline = None
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self.transport.close()

    return HeadDeadlineH11Protocol


class RequestSizeLimitMiddleware:
    """413 for a body over the limit: at once when its Content-Length says so, else as soon as the
    bytes received pass it; 408 when the whole body has not arrived within the timeout (one deadline
    for the body, not per chunk, so a byte every few seconds cannot hold a connection for hours). The body is read here, whole, before the
    route runs (FastAPI reads it whole too), so the route never sees a request cut short."""

    def __init__(self, app: ASGIApp, max_bytes: int, body_timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(scope, receive, send, self._too_large())
        chunks: list[bytes] = []
        received = 0
        deadline = asyncio.get_running_loop().time() + self.body_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - asyncio.get_running_loop().time()))
            except asyncio.TimeoutError:
                error = OpenAIError(f"the request body did not arrive whole within {self.body_timeout_s:g} s "
                                    "(--request-body-timeout-s)", 408)
                return await self._refuse(scope, receive, send, error)
            if message["type"] != "http.request":  # the client left before sending its body
                return
            chunks.append(message.get("body", b""))
            received += len(chunks[-1])
            if received > self.max_bytes:
                return await self._refuse(scope, receive, send, self._too_large())
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then: waiting for a disconnect, for as long as the response runs

        await self.app(scope, replay, send)

    def _too_large(self) -> OpenAIError:
        return OpenAIError(f"the request body is larger than {self.max_bytes} bytes (--max-request-body-bytes)", 413)

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, error: OpenAIError) -> None:
        response = error.to_json_response()
        response.headers["Connection"] = "close"  # the rest of the body is not read
        await response(scope, receive, send)
