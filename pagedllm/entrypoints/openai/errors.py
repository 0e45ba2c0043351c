"""Errors in OpenAI's JSON shape, and the handlers that make every failure one of them.

`{"error": {"message", "type", "param", "code"}}` with OpenAI's types: bad input is a 400
`invalid_request_error` (never a 500), an unknown model a 404 `model_not_found`, a missing or
wrong API key a 401 `invalid_api_key`, the engine's own failures 500/503 `server_error`.
"""

from __future__ import annotations

import json
import re
from http import HTTPStatus
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pagedllm.engine.async_llm import EngineDeadError, RequestFailedError
from pagedllm.entrypoints.openai.protocol import ErrorInfo, ErrorResponse
from pagedllm.logger import init_logger

logger = init_logger(__name__)


class OpenAIError(Exception):
    """Raised by the serving code; becomes an OpenAI-shaped JSON error with `status_code`."""

    def __init__(self, message: str, status_code: int = 400, param: Optional[str] = None,
                 code: Optional[str] = None, type: Optional[str] = None) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.param = param
        self.code = code
        self.type = type or ("invalid_request_error" if status_code < 500 else "server_error")

    def to_response(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code))

    def to_json_response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status_code == 401 else None
        return JSONResponse(self.to_response().model_dump(), status_code=self.status_code, headers=headers)


# SamplingParams name the offending field first ("top_p must be in (0, 1], got 2.0.").
_LEADING_FIELD = re.compile(r"^([a-z_]+) (?:must|cannot|contains)")


def bad_request(e: Exception, param: Optional[str] = None) -> OpenAIError:
    """A `ValueError` from validation as a 400, naming the parameter when the message does."""
    message = str(e)
    if param is None and (m := _LEADING_FIELD.match(message)):
        param = m.group(1)
    return OpenAIError(message, 400, param=param)


def from_engine_error(e: Exception) -> OpenAIError:
    """The engine's failures as HTTP errors: a request it rejected, failed, or a dead engine."""
    if isinstance(e, RequestFailedError):
        if e.status_code == 400:
            return bad_request(e)
        return OpenAIError(str(e), e.status_code)
    if isinstance(e, EngineDeadError):
        return OpenAIError(str(e), 503, code="engine_dead")
    return OpenAIError(f"internal error: {e!r}", 500)


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def _param_path(loc: tuple) -> list[str]:
    """`("body", "messages", 0, "content", "str")` -> `["messages", "0", "content"]`: stop at union tags."""
    path = []
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int) or (isinstance(part, str) and part.isidentifier() and part not in _TYPE_TAGS):
            path.append(str(part))
        else:
            break
    return path


def _validation_message(exc: RequestValidationError) -> tuple[str, Optional[str]]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    param = ".".join(_param_path(first.get("loc", ()))) or first.get("ctx", {}).get("param") or None
    parts = []
    for err in errors[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return "; ".join(parts), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return exc.to_json_response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return OpenAIError(message, 400, param=param).to_json_response()

    @app.exception_handler(json.JSONDecodeError)
    async def _json_error(request: Request, exc: json.JSONDecodeError) -> JSONResponse:
        return OpenAIError(f"the request body is not valid JSON: {exc}", 400).to_json_response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        try:
            phrase = HTTPStatus(exc.status_code).phrase
        except ValueError:
            phrase = "error"
        message = exc.detail if isinstance(exc.detail, str) else phrase
        return OpenAIError(message, exc.status_code).to_json_response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error while serving %s", request.url.path)
        return OpenAIError(f"internal server error: {type(exc).__name__}", 500).to_json_response()
