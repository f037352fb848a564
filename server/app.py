"""The Starlette application: create_app(engine, config, tokenizer=...) with a lifespan.

Everything the routes need hangs off `app.state.server` (a ServerState): no module globals, so
several apps (tests, one per model) can live in one process.

Middleware, outermost first: CORS (only when origins are configured; it answers preflights before
auth), metrics (status and duration per endpoint), API-key auth (everything but /health).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import errors
from .errors import APIError
from .metrics import Metrics
from .routes import routes
from .state import OPEN_PATHS, ServerConfig, ServerState

__all__ = ["ServerConfig", "ServerState", "create_app"]

log = logging.getLogger("mlxrun.server")

# Endpoints whose full duration is a generation (the request-duration histogram).
GENERATION_PATHS = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/fim/completions", "/infill",
     "/v1/messages", "/api/chat", "/api/generate", "/v1/responses"}
)  # fmt: skip


# ---------------------------------------------------------------- middleware


class AuthMiddleware:
    """The API key on every path but /health, as a bearer token or (Anthropic's clients) an
    x-api-key header; constant-time comparison."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self.key = api_key.encode("utf-8")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        header = headers.get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            return await self.app(scope, receive, send)
        x_api_key = headers.get(b"x-api-key")
        if x_api_key is not None and hmac.compare_digest(x_api_key.strip(), self.key):
            return await self.app(scope, receive, send)
        header = header or (x_api_key or b"")
        if header:
            message = "Incorrect API key provided."
        else:
            message = (
                "You didn't provide an API key. Send it in the Authorization header "
                "(Authorization: Bearer YOUR_KEY)."
            )
        err = APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        await err.response()(scope, receive, send)


class MetricsMiddleware:
    """Counts requests by endpoint and status, tracks in-flight requests and full durations."""

    def __init__(self, app: ASGIApp, metrics: Metrics, known_paths: frozenset[str]):
        self.app = app
        self.metrics = metrics
        self.known = known_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        # Unknown paths share one label so random URLs cannot grow the metric without bound.
        endpoint = (
            path
            if path in self.known
            else ("/v1/models/{id}" if path.startswith("/v1/models/") else "other")
        )
        status = 500
        start = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight += 1
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.in_flight -= 1
            self.metrics.count_request(endpoint, status)
            if endpoint in GENERATION_PATHS:
                self.metrics.duration.observe(time.perf_counter() - start)


# ---------------------------------------------------------------- lifespan


async def _start_engine(state: ServerState) -> None:
    """Start the engine off the event loop: its first forward pass pages the weights in, and
    /health answers 503 meanwhile."""
    try:
        await asyncio.to_thread(state.engine.start)
        state.ready = True
    except Exception as e:  # noqa: BLE001 - reported by /health and by every request
        state.load_error = e
        log.exception("the engine failed to start")
        if state.on_fatal is not None:
            state.on_fatal(e)


def _lifespan(state: ServerState):
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        starting = asyncio.get_running_loop().create_task(_start_engine(state))
        try:
            yield
        finally:
            state.ready = False
            await asyncio.gather(starting, return_exceptions=True)
            # Aborts what still runs and joins the engine thread; keep the loop free meanwhile.
            await asyncio.to_thread(state.engine.shutdown)

    return lifespan


def create_app(
    engine: Any,
    config: ServerConfig,
    *,
    tokenizer: Any,
    on_fatal: Callable[[BaseException], None] | None = None,
) -> Starlette:
    """An ASGI app serving `engine`, which its lifespan starts (in the background) and shuts down.

    `tokenizer` is the model's mlxrun Tokenizer; `on_fatal` is called if the engine fails to start
    (the CLI uses it to stop the server).
    """
    state = ServerState(engine, tokenizer, config)
    state.on_fatal = on_fatal
    known = frozenset(r.path for r in routes if "{" not in r.path)
    middleware = []
    if config.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(config.cors_origins),
                allow_methods=["GET", "POST", "OPTIONS"],
                allow_headers=["*"],
            )
        )
    middleware.append(Middleware(MetricsMiddleware, metrics=state.metrics, known_paths=known))
    if config.api_key:
        middleware.append(Middleware(AuthMiddleware, api_key=config.api_key))
    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers=errors.EXCEPTION_HANDLERS,
        lifespan=_lifespan(state),
    )
    app.state.server = state
    return app
