"""Error objects: every failure leaves the server as an error in the client's dialect, OpenAI's
{"error": {message, type, param, code}} unless the path is Anthropic's or Ollama's.

Typed mlxrun errors are mapped by class (never by message text); anything unexpected becomes a 500
object and is logged, and the server keeps serving.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from mlxrun.errors import (
    ContextLengthExceededError,
    EngineOverloadedError,
    InsufficientMemoryError,
    InvalidRequestError,
    MlxrunError,
    ModelNotFoundError,
)

from . import access

log = logging.getLogger("mlxrun.server")

INVALID = "invalid_request_error"
SERVER = "server_error"


class APIError(Exception):
    """An error with its HTTP status, raised anywhere in server/ and rendered by the app."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID,  # noqa: A002 - OpenAI's field name
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _context_error(exc: ContextLengthExceededError) -> APIError:
    """OpenAI's wording: the prompt alone, or the prompt with the completion asked for."""
    limit, prompt = exc.limit, exc.prompt_tokens
    if exc.max_tokens is None:
        message = (
            f"This model's maximum context length is {limit} tokens, but the prompt has "
            f"{prompt} tokens. Please shorten the prompt."
        )
    else:
        message = (
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt + exc.max_tokens} tokens ({prompt} in the prompt, {exc.max_tokens} for "
            "the completion). Please reduce the prompt or the completion length."
        )
    return APIError(400, message, param=exc.param, code="context_length_exceeded")


def model_not_found(model: str, available: Sequence[str] = ()) -> APIError:
    """404; `available` (the servable names) is listed so the client can pick one. The name is
    only ever compared with those: nothing is loaded or fetched because a request named it."""
    served = f" This server serves: {', '.join(available)}." if available else ""
    return APIError(
        404,
        f"The model `{model}` does not exist or you do not have access to it.{served}",
        param="model",
        code="model_not_found",
    )


def overloaded(retry_after: float) -> APIError:
    seconds = max(1, math.ceil(retry_after))
    return APIError(
        429,
        "The server is busy: too many requests are waiting. Please retry shortly.",
        type="rate_limit_error",
        code="rate_limit_exceeded",
        headers={"Retry-After": str(seconds)},
    )


def loading() -> APIError:
    return APIError(
        503,
        "The model is still loading. Please retry shortly.",
        type=SERVER,
        code="model_loading",
        headers={"Retry-After": "1"},
    )


def from_mlxrun(exc: MlxrunError) -> APIError:
    """The status and OpenAI shape for a typed mlxrun error (by class, most specific first)."""
    if isinstance(exc, ContextLengthExceededError):
        return _context_error(exc)
    if isinstance(exc, InvalidRequestError):
        return invalid(exc.message, exc.param)
    if isinstance(exc, EngineOverloadedError):
        return overloaded(exc.retry_after)
    if isinstance(exc, ModelNotFoundError):
        return APIError(404, exc.message, param="model", code="model_not_found")
    if isinstance(exc, InsufficientMemoryError):
        return APIError(
            503, exc.message, type=SERVER, code="insufficient_memory", headers={"Retry-After": "5"}
        )
    return APIError(500, exc.message, type=SERVER, code="internal_error")


def internal(exc: BaseException) -> APIError:
    log.exception("internal error while serving request %s", access.current().id, exc_info=exc)
    return APIError(
        500,
        f"The server had an internal error ({type(exc).__name__}). It is still running; the "
        "request can be retried.",
        type=SERVER,
        code="internal_error",
    )


def to_api_error(exc: BaseException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, MlxrunError):
        return from_mlxrun(exc)
    return internal(exc)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


async def handle_api_error(request: Request, exc: Exception) -> JSONResponse:
    return dialect_response(exc, access.dialect(request.url.path))


async def handle_http_exception(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own 404/405 (unknown route, wrong method) in the path's dialect."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"Unknown request URL: {request.method} {request.url.path}."
    elif exc.status_code == 405:
        message = f"Method {request.method} is not allowed on {request.url.path}."
    else:
        message = str(exc.detail)
    err = APIError(
        exc.status_code,
        message,
        type=INVALID if exc.status_code < 500 else SERVER,
        code=_HTTP_CODES.get(exc.status_code),
        headers=dict(exc.headers or {}),
    )
    return dialect_response(err, access.dialect(request.url.path))


async def handle_unexpected(request: Request, exc: Exception) -> JSONResponse:
    return dialect_response(exc, access.dialect(request.url.path))


EXCEPTION_HANDLERS = {
    APIError: handle_api_error,
    MlxrunError: handle_api_error,
    HTTPException: handle_http_exception,
    Exception: handle_unexpected,
}


# ---------------------------------------------------------------- dialects

_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                    403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                    429: "rate_limit_error", 503: "overloaded_error", 504: "timeout_error",
                    529: "overloaded_error"}  # fmt: skip


def anthropic_status(err: APIError) -> int:
    """Our engine's "queue full" 429 is Anthropic's 529 overloaded_error."""
    return 529 if err.code == "rate_limit_exceeded" else err.status


def anthropic_body(err: APIError) -> dict[str, Any]:
    status = anthropic_status(err)
    kind = _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    body: dict[str, Any] = {"type": "error", "error": {"type": kind, "message": err.message}}
    request_id = access.current().id
    if request_id:  # as Anthropic's errors carry it (also in the X-Request-Id header)
        body["request_id"] = request_id
    return body


def dialect_response(exc: BaseException, dialect: str) -> JSONResponse:
    """The error in the shape `dialect`'s clients parse: OpenAI's {"error": {...}}, Anthropic's
    {"type": "error", "error": {"type", "message"}} or Ollama's {"error": "message"}."""
    err = to_api_error(exc)
    if dialect == access.ANTHROPIC:
        status = anthropic_status(err)
        return JSONResponse(anthropic_body(err), status_code=status, headers=err.headers)
    if dialect == access.OLLAMA:
        return JSONResponse({"error": err.message}, status_code=err.status, headers=err.headers)
    return err.response()


def ollama_errors(
    handler: Callable[[Request], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    """An Ollama endpoint: every failure as Ollama sends it, {"error": message} with the status."""
    return guarded(handler, lambda e: dialect_response(e, access.OLLAMA))


def _openai_error(e: Exception) -> Response:
    return to_api_error(e).response()


def guarded(
    handler: Callable[[Request], Awaitable[Response]],
    respond: Callable[[Exception], Response] = _openai_error,
) -> Callable[[Request], Awaitable[Response]]:
    """An endpoint that turns every exception into its error object (never a bare 500 page);
    `respond` writes it in the endpoint's dialect (OpenAI's by default)."""

    @functools.wraps(handler)
    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except Exception as e:  # noqa: BLE001 - the HTTP edge: everything becomes an error object
            return respond(e)

    return endpoint
