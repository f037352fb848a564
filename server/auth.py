"""Who is asking: named API keys, the principal a request runs as, and per-key limits.

Keys come from `--api-key` (named "default") and `--api-key-file` (one `name:key` a line, `#`
comments); only their SHA-256 digests are kept, and the file is read again on SIGHUP. The auth
middleware (server/app.py) puts the request's Principal on `request.state.principal`; routes read
it with `principal(request)` and tag what a request creates (FIM groups, cache pins, stored
responses) with `owner(request)`, so another key never reaches it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mlxrun.errors import InvalidRequestError

from .errors import APIError

if TYPE_CHECKING:
    from starlette.requests import Request

log = logging.getLogger("mlxrun.server")

DEFAULT_KEY_NAME = "default"  # the principal --api-key authenticates as


@dataclass(frozen=True)
class Principal:
    """An authenticated caller. `name` is the key's name: safe to log, never the key."""

    name: str


ANONYMOUS = Principal("anonymous")  # no key is configured: everyone is the same caller


def principal(request: Request) -> Principal:
    """The request's principal, as the auth middleware set it (ANONYMOUS without auth)."""
    found = request.scope.get("state", {}).get("principal")
    return found if isinstance(found, Principal) else ANONYMOUS


def owner(request: Request) -> str:
    """The owner tag for state a request creates: equal only for requests of the same key."""
    return "key:" + principal(request).name


def cache_scope(request: Request) -> str | None:
    """The prefix-cache namespace for state a request pins: the key's own with API keys (another
    key neither reads nor renews it, nor learns from cached-token counts that it exists)."""
    return None if principal(request) is ANONYMOUS else owner(request)


def _digest(key: str | bytes) -> bytes:
    raw = key.encode("utf-8") if isinstance(key, str) else key
    return hashlib.sha256(raw).digest()


def parse_key_file(text: str, source: str) -> list[tuple[str, str]]:
    """`name:key` lines -> [(name, key)]; errors name the line, never the key."""
    pairs: list[tuple[str, str]] = []
    seen: set[str] = set()
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, key = (part.strip() for part in line.partition(":"))
        if not sep or not name or not key:
            raise InvalidRequestError(
                f"{source}:{number}: expected `name:key`",
                param="api_key_file",
                hint="Write one key a line, e.g. `laptop:3f9c…` (names are shown in logs).",
            )
        if name in seen:
            raise InvalidRequestError(
                f"{source}:{number}: the name {name!r} is used twice", param="api_key_file"
            )
        seen.add(name)
        pairs.append((name, key))
    return pairs


def read_key_file(path: str | Path) -> list[tuple[str, str]]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidRequestError(
            f"cannot read --api-key-file {path}: {getattr(e, 'strerror', None) or e}",
            param="api_key_file",
        ) from None
    return parse_key_file(text, str(path))


class KeyRing:
    """Key digests -> principals. `reload()` re-reads the key file (SIGHUP); a bad file keeps
    the keys in force and logs one line."""

    def __init__(self, keys: Iterable[tuple[str, str]] = (), file: str | Path | None = None):
        self._fixed = [(_digest(k), Principal(n)) for n, k in keys]
        self.file = Path(file) if file is not None else None
        self._digests: list[tuple[bytes, Principal]] = []
        self._load(read_key_file(self.file) if self.file is not None else [])

    def _load(self, from_file: list[tuple[str, str]]) -> None:
        self._digests = [*self._fixed, *((_digest(k), Principal(n)) for n, k in from_file)]

    def __bool__(self) -> bool:
        return bool(self._digests)

    @property
    def names(self) -> list[str]:
        return [p.name for _, p in self._digests]

    def reload(self) -> bool:
        """Re-read the key file; whether the new keys are in force."""
        if self.file is None:
            return False
        try:
            self._load(read_key_file(self.file))
        except InvalidRequestError as e:
            log.warning("keeping the current API keys: %s", e.message)
            return False
        log.info("API keys reloaded from %s: %s", self.file, ", ".join(self.names) or "none")
        return True

    def lookup(self, key: bytes) -> Principal | None:
        """The principal of `key`; every digest is compared (constant time, no early exit)."""
        digest, found = _digest(key), None
        for known, who in self._digests:
            if hmac.compare_digest(known, digest) and found is None:
                found = who
        return found


# ---------------------------------------------------------------- per-key limits


def over_limit(name: str, retry_after: float) -> APIError:
    """429 with Retry-After; Anthropic's dialect renders it as its rate_limit_error."""
    return APIError(
        429,
        f"Too many requests in flight for the API key {name!r}: wait for one to finish.",
        type="rate_limit_error",
        code="key_rate_limit_exceeded",
        headers={"Retry-After": str(max(1, math.ceil(retry_after)))},
    )


class _Slots:
    def __init__(self, running: int):
        self.free = asyncio.Semaphore(running)
        self.waiting = 0


class KeyLimits:
    """At most `running` requests at once per key and `queued` more waiting for a slot; past
    that a request is refused at once, so one client cannot starve the others."""

    def __init__(self, running: int, queued: int):
        self.running, self.queued = running, queued
        self._slots: dict[str, _Slots] = {}

    def _for(self, name: str) -> _Slots:
        slots = self._slots.get(name)
        if slots is None:
            slots = self._slots[name] = _Slots(self.running)
        return slots

    async def acquire(self, name: str) -> None:
        """Wait for a slot; raises the 429 APIError when the key's queue is full."""
        slots = self._for(name)
        if not slots.free.locked():
            await slots.free.acquire()
            return
        if slots.waiting >= self.queued:
            raise over_limit(name, 1.0)
        slots.waiting += 1
        try:
            await slots.free.acquire()
        finally:
            slots.waiting -= 1

    def release(self, name: str) -> None:
        self._for(name).free.release()
