"""What other threads ask of the engine thread: small values put on its command queue."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stop:
    """Abort everything, flush the cache tiers and end the loop."""


@dataclass(frozen=True)
class Abort:
    """End one request within a step (finish_reason "abort")."""

    request_id: str


@dataclass(frozen=True)
class Wake:
    """New work was registered: an idle loop should schedule again."""


Command = Stop | Abort | Wake
