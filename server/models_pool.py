"""Many models behind one server: each is loaded on first use onto its own engine, under one
memory budget (mlxrun/governor.py), and unloaded when idle past its keep-alive or evicted to make
room for another.

A request picks its model with `use_model(request, name)`: the model's own ServerState comes back
(engine, tokenizer, per-model config; metrics and stored responses shared with the app) and the
request holds a lease on it until its response has been sent (LeaseMiddleware releases it, after
a stream's last byte), so a model with running requests is never evicted.

Loads run on a worker thread: requests to resident models keep being served meanwhile. Two
requests for the same model share one load. Everything else runs on the event loop's thread,
which is why the governor needs no lock.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fnmatch
import functools
import gc
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from mlxrun.errors import InsufficientMemoryError
from mlxrun.governor import DEFAULT_KEEP_ALIVE_S, Governor, parse_keep_alive
from mlxrun.memory import is_allocation_failure

from . import errors
from .state import ServerState, server_state

log = logging.getLogger("mlxrun.server")

KEEP_ALIVE_HEADER = "x-mlxrun-keep-alive"
LEASES = "mlxrun.leases"  # scope key: the (pool, model) leases this request holds
REAP_INTERVAL_S = 0.2


@dataclass(frozen=True)
class ModelSpec:
    """A servable model: its id, where it lives, and its own settings (models.toml)."""

    name: str
    path: str
    aliases: tuple[str, ...] = ()
    context: int | None = None
    keep_alive_s: float | None = None  # None: the server's --keep-alive
    draft: str | None = None
    sampling: dict[str, Any] = field(default_factory=dict)

    def answers_to(self, name: str) -> bool:
        """An id or alias, Ollama's "name:latest", or an alias pattern such as "claude-*"."""
        for candidate in (name, name.removesuffix(":latest")):
            if candidate == self.name or candidate in self.aliases:
                return True
        return any(_is_pattern(a) and fnmatch.fnmatchcase(name, a) for a in self.aliases)


@dataclass(frozen=True)
class PoolSettings:
    budget_bytes: int
    max_loaded: int | None = None
    keep_alive_s: float = DEFAULT_KEEP_ALIVE_S
    engine: Any = None  # an EngineConfig template; per-model fields are filled in at load
    preload_default: bool = False  # load the default model at startup (`mlxrun serve A B`)


@dataclass
class Slot:
    """A loaded model: its engine and state, what it is charged, how long it took to load."""

    spec: ModelSpec
    state: ServerState
    nbytes: int
    load_s: float
    loaded_at: float
    info: Any = None  # mlxrun.loader.ModelInfo


@dataclass
class ModelCounts:
    loads: int = 0
    unloads: int = 0
    evictions: int = 0
    load_seconds: float = 0.0


class ModelPool:
    def __init__(self, specs: Sequence[ModelSpec], settings: PoolSettings):
        self.specs = list(specs)
        self.settings = settings
        self.governor = Governor(settings.budget_bytes, settings.max_loaded)
        self.slots: dict[str, Slot] = {}
        self.counts: dict[str, ModelCounts] = {s.name: ModelCounts() for s in self.specs}
        self.hub: ServerState | None = None  # the app's state (set by create_app)
        self.peak_resident = 0  # most models resident at once (tests and /metrics)
        self._loading: dict[str, asyncio.Future] = {}
        self._unloading: dict[str, asyncio.Event] = {}  # set once the engine has stopped
        self._reaper: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()  # unloads in flight (the loop holds tasks weakly)

    # -- names ------------------------------------------------------------------------------

    @property
    def preload_default(self) -> bool:
        return self.settings.preload_default

    @property
    def default(self) -> ModelSpec | None:
        return self.specs[0] if self.specs else None

    @property
    def model_ids(self) -> tuple[str, ...]:
        """Every servable id and plain alias, as /v1/models lists them."""
        out: list[str] = []
        for s in self.specs:
            out += [s.name, *(a for a in s.aliases if not _is_pattern(a) and a != s.name)]
        return tuple(dict.fromkeys(out))

    def find(self, name: str | None) -> ModelSpec:
        """The spec `name` means (None: the default model); 404 otherwise."""
        if name is None and self.default is not None:
            return self.default
        spec = next((s for s in self.specs if name is not None and s.answers_to(name)), None)
        if spec is None:
            raise errors.model_not_found(str(name), self.model_ids)
        return spec

    def apply_defaults(self, body: Any, path: str) -> None:
        """models.toml's default sampling for the model the body names (server/model_defaults)."""
        from .model_defaults import apply_defaults

        name = body.get("model") if isinstance(body, dict) else None
        spec = next((s for s in self.specs if isinstance(name, str) and s.answers_to(name)), None)
        if spec is not None:
            apply_defaults(body, path, spec.sampling)

    # -- using a model ----------------------------------------------------------------------

    async def acquire(self, spec: ModelSpec) -> ServerState:
        """The model's state, loaded if need be, with a lease held until `release`."""
        while True:
            slot = self.slots.get(spec.name)
            if slot is not None and not slot.state.engine.is_alive:
                log.error("the engine of %s has stopped: loading it again", spec.name)
                await self._unload(spec.name)  # its requests have had their error
                continue
            if slot is not None:
                self.governor.lease(spec.name, time.monotonic())
                return slot.state
            task = self._loading.get(spec.name)
            if task is None:
                task = asyncio.ensure_future(self._load(spec))
                self._loading[spec.name] = task
                task.add_done_callback(functools.partial(self._load_done, spec.name))
            # Shielded: a client that leaves does not cancel a load others may be waiting on.
            await asyncio.shield(task)

    def _load_done(self, name: str, _task: object) -> None:
        self._loading.pop(name, None)

    def release(self, name: str, keep_alive_s: float | None = None) -> None:
        self.governor.release(name, time.monotonic(), keep_alive_s)
        self._wake_reaper()

    async def preload(self, spec: ModelSpec, keep_alive_s: float | None = None) -> None:
        """Load (Ollama's empty-prompt call) and start the idle clock from now."""
        await self.acquire(spec)
        self.release(spec.name, keep_alive_s)

    # -- loading and unloading --------------------------------------------------------------

    async def _load(self, spec: ModelSpec) -> None:
        from . import model_loading

        gone = self._unloading.get(spec.name)
        if gone is not None:  # evicted a moment ago: its old engine must be gone first
            await gone.wait()
        estimate = await anyio.to_thread.run_sync(
            model_loading.estimate, spec, self.settings, self.governor.budget_bytes
        )
        victims = self.governor.plan_load(spec.name, estimate.nbytes)
        keep = self._keep_alive(spec)
        self.governor.reserve(spec.name, estimate.nbytes, time.monotonic(), keep)
        # Detached now, before any await: no request may lease a model that is going.
        going = [(v, self._detach(v)) for v in victims]
        try:
            for victim in victims:
                self.counts[victim].evictions += 1
                log.info("evicting %s to make room for %s", victim, spec.name)
            await asyncio.gather(*(self._stop(v, slot) for v, slot in going if slot))
            start = time.perf_counter()
            engine, tokenizer, info = await anyio.to_thread.run_sync(
                model_loading.load_engine, spec, estimate, self.settings.engine
            )
        except RuntimeError as e:
            self.governor.forget(spec.name)
            if not is_allocation_failure(e):
                raise
            raise InsufficientMemoryError(f"out of memory while loading {spec.name} ({e})",
                                          needed=estimate.nbytes) from None  # fmt: skip
        except BaseException:
            self.governor.forget(spec.name)
            raise
        load_s = time.perf_counter() - start
        self.slots[spec.name] = Slot(
            spec, self._model_state(spec, engine, tokenizer, estimate.context),
            estimate.nbytes, load_s, time.time(), info,
        )  # fmt: skip
        self.governor.loaded(spec.name, time.monotonic())
        self.counts[spec.name].loads += 1
        self.counts[spec.name].load_seconds += load_s
        self.peak_resident = max(self.peak_resident, len(self.slots) + len(self._unloading))
        log.info("loaded %s in %.2f s (%s bytes charged)", spec.name, load_s, estimate.nbytes)
        self._ensure_reaper()

    def _model_state(self, spec: ModelSpec, engine: Any, tokenizer: Any, ctx: int) -> ServerState:
        assert self.hub is not None
        config = dataclasses.replace(
            self.hub.config, model_id=spec.name, context_length=ctx,
            aliases=tuple(a for a in spec.aliases if a != spec.name),
        )  # fmt: skip
        return self.hub.for_model(engine, tokenizer, config)

    def _keep_alive(self, spec: ModelSpec) -> float:
        return self.settings.keep_alive_s if spec.keep_alive_s is None else spec.keep_alive_s

    async def unload(self, name: str) -> bool:
        """Unload now if idle (Ollama's keep_alive 0 call); False when busy or not loaded."""
        resident = self.governor.residents.get(name)
        if name not in self.slots or resident is None or resident.active:
            return False
        await self._unload(name)
        return True

    async def _unload(self, name: str) -> None:
        slot = self._detach(name)
        if slot is not None:
            await self._stop(name, slot)

    def _detach(self, name: str) -> Slot | None:
        """Take the model out of service (synchronously: no lease can slip in after)."""
        slot = self.slots.pop(name, None)
        if slot is None:
            return None
        self._unloading[name] = asyncio.Event()
        resident = self.governor.residents.get(name)
        if resident is not None:
            resident.loading = True  # neither evictable nor expirable while it goes
        return slot

    async def _stop(self, name: str, slot: Slot) -> None:
        """Stop a detached model's engine (on a worker thread) and hand its memory back."""
        gone = self._unloading[name]
        try:
            await anyio.to_thread.run_sync(_shutdown, slot.state.engine)
        finally:
            del self._unloading[name]
            self.governor.forget(name)
            self.counts[name].unloads += 1
            gone.set()
        log.info("unloaded %s", name)

    # -- keep-alive -------------------------------------------------------------------------

    def _ensure_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap())

    def _wake_reaper(self) -> None:
        """keep_alive 0: unload as soon as the request is done, not at the next tick."""
        now = time.monotonic()
        for name in self.governor.expired(now):
            if name in self.slots:
                task = asyncio.get_running_loop().create_task(self.unload(name))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _reap(self) -> None:
        while self.slots:
            for name in self.governor.expired(time.monotonic()):
                if name in self.slots:
                    await self.unload(name)
            await asyncio.sleep(REAP_INTERVAL_S)

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        await asyncio.gather(*self._loading.values(), *self._tasks, return_exceptions=True)
        await asyncio.gather(*(self._unload(n) for n in list(self.slots)))

    # -- reporting --------------------------------------------------------------------------

    def loaded(self) -> list[dict[str, Any]]:
        """What is in memory now: name, bytes, seconds since last use, seconds to expiry."""
        now, out = time.monotonic(), []
        for name, slot in list(self.slots.items()):
            r = self.governor.residents.get(name)
            if r is None:
                continue
            out.append({
                "name": name, "bytes": slot.nbytes, "active": r.active,
                "idle_s": 0.0 if r.active else now - r.last_used,
                "expires_in_s": r.expires_at() - now, "context_length": slot.state.config.context_length,
                "load_s": slot.load_s, "spec": slot.spec, "state": slot.state,
            })  # fmt: skip
        return out


def _shutdown(engine: Any) -> None:
    engine.shutdown()
    gc.collect()  # the model's arrays go with the last reference
    from mlxrun.memory import release_cache

    release_cache()


def _is_pattern(alias: str) -> bool:
    return any(c in alias for c in "*?[")


# ---------------------------------------------------------------- per request


def request_keep_alive(request: Request, body_value: Any = None) -> float | None:
    """The request's own keep-alive: Ollama's `keep_alive` field, else the X-Mlxrun-Keep-Alive
    header; None when neither is sent."""
    value = body_value if body_value is not None else request.headers.get(KEEP_ALIVE_HEADER)
    if value is None:
        return None
    try:
        return parse_keep_alive(value)
    except Exception as e:  # noqa: BLE001 - a typed InvalidRequestError
        raise errors.to_api_error(e) from None


async def use_model(request: Request, name: str | None, keep_alive: Any = None) -> ServerState:
    """The state of the model `name` picks (None: the default), loaded if need be; the request
    holds it until its response is sent. A one-model app checks the name and readiness."""
    hub = server_state(request)
    pool = hub.pool
    if pool is None:
        if name is not None:
            hub.check_model(name)
        hub.check_ready()
        return hub
    keep = request_keep_alive(request, keep_alive)
    spec = pool.find(name)
    try:
        state = await pool.acquire(spec)
    except InsufficientMemoryError as e:
        raise errors.from_mlxrun(e) from None
    request.scope.setdefault(LEASES, []).append((spec.name, keep))
    return state


class LeaseMiddleware:
    """Releases the models a request used once its response has been sent (a stream's too)."""

    def __init__(self, app: ASGIApp, pool: ModelPool):
        self.app = app
        self.pool = pool

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        scope[LEASES] = []
        try:
            await self.app(scope, receive, send)
        finally:
            for name, keep in scope[LEASES]:
                self.pool.release(name, keep)
