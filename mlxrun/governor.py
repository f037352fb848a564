"""The memory governor: which models may be resident together under one byte budget.

Pure bookkeeping (no MLX, no asyncio): the server's model pool asks `plan_load` which models to
evict before loading another, marks requests in and out with `lease` / `release`, and asks
`expired` which idle models have outlived their keep-alive. Each model is charged what it can
hold at its peak: weights + its KV budget + its prefix cache.

Rules: a model with running requests is never evicted; loading evicts the least recently used
idle models until the newcomer fits (and `max_loaded` holds); when even that is not enough the
load is refused with InsufficientMemoryError naming what is loaded, which the server sends as a
503. A model larger than the whole budget can never load.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from mlxrun.errors import InsufficientMemoryError, InvalidRequestError, format_size

FOREVER = math.inf
DEFAULT_KEEP_ALIVE_S = 300.0  # Ollama's default: five minutes
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def parse_keep_alive(value: object) -> float:
    """Seconds a model stays loaded once idle, as Ollama reads `keep_alive`: a number of seconds
    or a Go duration ("5m", "1h30m", "2.5s", "0"); any negative value means forever."""
    if isinstance(value, bool) or value is None:
        raise InvalidRequestError(f"invalid keep_alive {value!r}", param="keep_alive")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = str(value).strip().lower()
        try:
            seconds = float(text)
        except ValueError:
            sign = -1.0 if text.startswith("-") else 1.0
            body = text.lstrip("+-")
            parts = _DURATION.findall(body)
            if not body or "".join(n + u for n, u in parts) != body:
                raise InvalidRequestError(
                    f"invalid keep_alive {value!r}",
                    param="keep_alive",
                    hint='Write a duration like "5m", "30s" or "1h", 0 to unload at once, -1 '
                    "to keep the model loaded.",
                ) from None
            seconds = sign * sum(float(n) * _UNIT_S[u] for n, u in parts)
    if math.isnan(seconds):
        raise InvalidRequestError(f"invalid keep_alive {value!r}", param="keep_alive")
    return FOREVER if seconds < 0 else seconds


@dataclass
class Resident:
    """One loaded (or loading) model's charge and use."""

    name: str
    nbytes: int
    last_used: float
    keep_alive_s: float = DEFAULT_KEEP_ALIVE_S
    active: int = 0  # requests holding it now
    loading: bool = True

    def expires_at(self) -> float:
        """When it unloads if nothing uses it again (inf: never; while busy, not yet known)."""
        if self.active or self.loading:
            return FOREVER
        return self.last_used + self.keep_alive_s


class Governor:
    """Budget bookkeeping for resident models; every method runs on one thread (the loop's)."""

    def __init__(self, budget_bytes: int, max_loaded: int | None = None):
        if budget_bytes <= 0:
            raise InvalidRequestError("the memory budget must be positive", param="memory_budget")
        if max_loaded is not None and max_loaded < 1:
            raise InvalidRequestError("--max-loaded must be at least 1", param="max_loaded")
        self.budget_bytes = budget_bytes
        self.max_loaded = max_loaded
        self.residents: dict[str, Resident] = {}

    @property
    def used_bytes(self) -> int:
        return sum(r.nbytes for r in self.residents.values())

    def plan_load(self, name: str, nbytes: int) -> list[str]:
        """The models to evict (least recently used first) so `name` fits; raises
        InsufficientMemoryError when it never can or when the rest are busy."""
        if nbytes > self.budget_bytes:
            raise InsufficientMemoryError(
                f"model {name} needs {format_size(nbytes)} (weights, KV and prefix cache) but "
                f"the memory budget is {format_size(self.budget_bytes)}",
                needed=nbytes,
                available=self.budget_bytes,
                hint="Raise --memory-budget, or give the model a shorter context or a smaller "
                "--cache-memory.",
            )
        others = [r for r in self.residents.values() if r.name != name]
        idle = sorted((r for r in others if not r.active and not r.loading),
                      key=lambda r: r.last_used)  # fmt: skip
        free = self.budget_bytes - sum(r.nbytes for r in others)
        count, victims = len(others), []
        for r in idle:
            if free >= nbytes and (self.max_loaded is None or count < self.max_loaded):
                break
            victims.append(r.name)
            free += r.nbytes
            count -= 1
        if free < nbytes or (self.max_loaded is not None and count >= self.max_loaded):
            raise self._busy(name, nbytes)
        return victims

    def _busy(self, name: str, nbytes: int) -> InsufficientMemoryError:
        loaded = ", ".join(
            f"{r.name} ({format_size(r.nbytes)}, "
            + ("loading" if r.loading else f"{r.active} running")
            + ")"
            for r in self.residents.values()
        )
        return InsufficientMemoryError(
            f"cannot load model {name} ({format_size(nbytes)}): the memory budget of "
            f"{format_size(self.budget_bytes)} is held by models that are busy: {loaded}",
            needed=nbytes,
            available=self.budget_bytes - self.used_bytes,
            hint="Retry once their requests finish, or raise --memory-budget / --max-loaded.",
        )

    def reserve(self, name: str, nbytes: int, now: float, keep_alive_s: float) -> Resident:
        """Charge `name` now, before its load starts (so concurrent loads see the charge)."""
        resident = Resident(name, nbytes, now, keep_alive_s)
        self.residents[name] = resident
        return resident

    def loaded(self, name: str, now: float) -> None:
        resident = self.residents[name]
        resident.loading, resident.last_used = False, now

    def forget(self, name: str) -> Resident | None:
        return self.residents.pop(name, None)

    def lease(self, name: str, now: float) -> None:
        resident = self.residents[name]
        resident.active += 1
        resident.last_used = now

    def release(self, name: str, now: float, keep_alive_s: float | None = None) -> None:
        """A request is done; `keep_alive_s` (the request's own) sets the idle time from now."""
        resident = self.residents.get(name)
        if resident is None:
            return
        resident.active = max(0, resident.active - 1)
        resident.last_used = now
        if keep_alive_s is not None:
            resident.keep_alive_s = keep_alive_s

    def expired(self, now: float) -> list[str]:
        """Idle models whose keep-alive has run out."""
        return [r.name for r in self.residents.values() if r.expires_at() <= now]
