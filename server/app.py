"""The Starlette application: create_app(engine, config, tokenizer=...) with a lifespan.

Everything the routes need hangs off `app.state.server` (a ServerState): no module globals, so
several apps (tests, one per model) can live in one process.

Middleware, outermost first: CORS (only when origins are configured; it answers preflights before
auth), access (request id, clamp header, access log line), metrics (status and duration per
endpoint), API-key auth (everything but /health), the readiness gate (503 until the engine runs).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import access, auth, errors
from .errors import APIError
from .metrics import Metrics
from .routes import routes
from .state import OPEN_PATHS, ServerConfig, ServerState

if TYPE_CHECKING:
    from mlxrun.engine import Engine
    from mlxrun.tokenizer import Tokenizer

    from .models_pool import ModelPool

CLAMP_HEADER = "X-Mlxrun-Max-Tokens-Clamped"
# Answered before the engine is ready: health and metrics, Ollama's "is it running?" probes, and
# Ollama's generation routes (they wait for the model, as Ollama does).
UNGATED_PATHS = frozenset(
    {"/health", "/metrics", "/", "/api/version", "/api/chat", "/api/generate"}
)

__all__ = ["ServerConfig", "ServerState", "create_app"]

log = logging.getLogger("mlxrun.server")

# Endpoints whose full duration is a generation (the request-duration histogram).
GENERATION_PATHS = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/fim/completions", "/infill",
     "/v1/messages", "/api/chat", "/api/generate", "/v1/responses"}
)  # fmt: skip


# ---------------------------------------------------------------- middleware


# What a request without the key is told, per dialect: the header that dialect's clients send.
_MISSING_KEY = {
    access.OPENAI: "You didn't provide an API key. Send it in the Authorization header "
    "(Authorization: Bearer YOUR_KEY).",
    access.ANTHROPIC: "x-api-key header is required (or Authorization: Bearer YOUR_KEY).",
    access.OLLAMA: "This server needs an API key: send it in the Authorization header "
    "(Authorization: Bearer YOUR_KEY).",
}
_WRONG_KEY = {
    access.OPENAI: "Incorrect API key provided.",
    access.ANTHROPIC: "invalid x-api-key",
    access.OLLAMA: "Incorrect API key provided.",
}


class AuthMiddleware:
    """An API key on every path but the open probes, as a bearer token or (Anthropic's clients)
    an x-api-key header, looked up among the key digests (server/auth.py). The key's principal
    goes on `request.state.principal` and its name on the access record; a 401 is written in
    the path's dialect. With no keys configured everyone is auth.ANONYMOUS."""

    def __init__(self, app: ASGIApp, keys: auth.KeyRing | None):
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if not self.keys:
            return await self._as(auth.ANONYMOUS, scope, receive, send)
        headers = dict(scope["headers"])
        header = headers.get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        x_api_key = headers.get(b"x-api-key")
        sent = token.strip() if scheme.lower() == b"bearer" else (x_api_key or b"").strip()
        who = self.keys.lookup(sent) if sent else None
        if who is None and x_api_key is not None and sent != x_api_key.strip():
            who = self.keys.lookup(x_api_key.strip())
        if who is not None or scope["path"] in OPEN_PATHS:
            return await self._as(who or auth.ANONYMOUS, scope, receive, send)
        dialect = access.dialect(scope["path"])
        messages = _WRONG_KEY if header or x_api_key else _MISSING_KEY
        message = messages.get(dialect, messages[access.OPENAI])
        challenge = {} if dialect == access.ANTHROPIC else {"WWW-Authenticate": "Bearer"}
        err = APIError(401, message, code="invalid_api_key", headers=challenge)
        await errors.dialect_response(err, dialect)(scope, receive, send)

    async def _as(self, who: auth.Principal, scope: Scope, receive: Receive, send: Send) -> None:
        scope.setdefault("state", {})["principal"] = who
        if who is not auth.ANONYMOUS:
            access.current().principal = who.name
        await self.app(scope, receive, send)


class KeyLimitMiddleware:
    """--max-concurrent-per-key: generation requests beyond a key's slots wait in its own queue;
    past --max-queued-per-key they get a 429 with Retry-After in the path's dialect."""

    def __init__(self, app: ASGIApp, limits: auth.KeyLimits):
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in GENERATION_PATHS:
            return await self.app(scope, receive, send)
        name = scope.get("state", {}).get("principal", auth.ANONYMOUS).name
        try:
            await self.limits.acquire(name)
        except APIError as e:
            return await errors.dialect_response(e, access.dialect(scope["path"]))(
                scope, receive, send
            )
        try:
            await self.app(scope, receive, send)
        finally:
            self.limits.release(name)


class ReadyGate:
    """Until the engine has started (and once it has stopped), every route but the probes
    answers 503 in its dialect, so /v1/models and /api/tags agree with /health. Ollama's
    generation routes are let through: they hold the request while the model loads."""

    def __init__(self, app: ASGIApp, state: ServerState):
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"] if scope["type"] == "http" else ""
        if not path or path in UNGATED_PATHS or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        try:
            self.state.check_ready()
        except APIError as e:
            return await errors.dialect_response(e, access.dialect(path))(scope, receive, send)
        await self.app(scope, receive, send)


class AccessMiddleware:
    """The request's record (server/access.py): an X-Request-Id header on every response, the
    X-Mlxrun-Max-Tokens-Clamped header when max_tokens was cut, one access log line at the end."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        record, token = access.begin(scope["method"], scope["path"])
        start = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                headers = MutableHeaders(scope=message)
                headers.append("X-Request-Id", record.id)
                if record.clamp:
                    headers.append(CLAMP_HEADER, record.clamp)
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            access.access_log.info("%s", record.line(time.perf_counter() - start))
            access.end(token)


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
            who = scope.get("state", {}).get("principal")
            key = None if who in (None, auth.ANONYMOUS) else who.name
            self.metrics.count_request(endpoint, status, key)
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
        return
    if state.on_ready is not None:
        await state.on_ready()


async def _start_pool(state: ServerState) -> None:
    """Several models: load the default one now when asked to (`mlxrun serve A B`), the rest on
    first use; ready either way once that is done."""
    pool = state.pool
    assert pool is not None
    try:
        if pool.preload_default and pool.default is not None:
            await pool.preload(pool.default)
        state.ready = True
    except Exception as e:  # noqa: BLE001 - reported by /health and by every request
        state.load_error = e
        log.exception("the default model failed to load")
        if state.on_fatal is not None:
            state.on_fatal(e)
        return
    if state.on_ready is not None:
        await state.on_ready()


def _pool_lifespan(state: ServerState):
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        starting = asyncio.get_running_loop().create_task(_start_pool(state))
        try:
            yield
        finally:
            state.ready = False
            await asyncio.gather(starting, return_exceptions=True)
            assert state.pool is not None
            await state.pool.close()

    return lifespan


def _lifespan(state: ServerState):
    if state.pool is not None:
        return _pool_lifespan(state)

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
    engine: Engine | None,
    config: ServerConfig,
    *,
    tokenizer: Tokenizer | None,
    on_fatal: Callable[[BaseException], None] | None = None,
    on_ready: Callable[[], Awaitable[None]] | None = None,
    pool: ModelPool | None = None,
) -> Starlette:
    """An ASGI app serving `engine`, which its lifespan starts (in the background) and shuts down.

    `tokenizer` is the model's mlxrun Tokenizer; `on_fatal` is called if the engine fails to start
    (the CLI uses it to stop the server), `on_ready` is awaited once it has started (the CLI
    prints its banner then). With `pool` (server/models_pool.ModelPool) `engine` and `tokenizer`
    are None: each request's model is loaded from the pool on first use.
    """
    # With a pool this is the hub's state, which has no engine of its own: routes serve through
    # the state use_model() hands them (ServerState.for_model).
    state = ServerState(engine, tokenizer, config)  # type: ignore[arg-type]
    if pool is not None:
        state.pool, pool.hub = pool, state
    state.on_fatal = on_fatal
    state.on_ready = on_ready
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
    middleware.append(Middleware(AccessMiddleware))
    middleware.append(Middleware(MetricsMiddleware, metrics=state.metrics, known_paths=known))
    keys = key_ring(config)
    middleware.append(Middleware(AuthMiddleware, keys=keys))
    if config.max_concurrent_per_key:
        running = config.max_concurrent_per_key
        queued = running if config.max_queued_per_key is None else config.max_queued_per_key
        middleware.append(Middleware(KeyLimitMiddleware, limits=auth.KeyLimits(running, queued)))
    middleware.append(Middleware(ReadyGate, state=state))
    if pool is not None:
        from .models_pool import LeaseMiddleware

        middleware.append(Middleware(LeaseMiddleware, pool=pool))
    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers=errors.EXCEPTION_HANDLERS,
        lifespan=_lifespan(state),
    )
    app.state.server = state
    app.state.keys = keys  # the CLI reloads its file on SIGHUP
    return app


def key_ring(config: ServerConfig) -> auth.KeyRing | None:
    """The configured keys (--api-key is the principal "default"); None: no auth."""
    fixed = list(config.api_keys)
    if config.api_key:
        fixed.insert(0, (auth.DEFAULT_KEY_NAME, config.api_key))
    if not fixed and config.api_key_file is None:
        return None
    return auth.KeyRing(fixed, config.api_key_file)
