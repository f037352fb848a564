"""FIM request plumbing shared by the three FIM dialects (completions with `suffix`, /v1/fim/completions,
/infill and Ollama's suffix): priority and stale requests.

Stale requests. FIM requests (completions with `suffix`, /v1/fim/completions, /infill, Ollama) run at priority 1,
before chat and batch work, in a cancellation group: a new request makes the engine abort its
group's unfinished older ones, whose responses end cleanly with the text so far (finish_reason
"abort" on completions; each dialect's own way in its route). Groups never span clients; a client is its API key's
principal (server/auth.py), or without auth the key it sends. Within a client the group is:

1. the `X-Mlxrun-Group` header when sent: each request supersedes the previous one with that value;
2. else prompt-prefix lineage: the request joins the group of the newest in-flight FIM request with
   an equal suffix whose prefix (all text before the cursor) is one typing run away: the shorter
   prefix, cut after its last whitespace (its partial word or line dropped), starts the longer one.
   Typing, deleting and new lines at the cursor thus supersede; a request elsewhere in the file (or
   after the editor's prefix window slid) starts a group of its own.

Requests with several choices, and llama.cpp warm-ups (n_predict 0, at priority 0), join no group.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace

from starlette.requests import Request

from . import auth
from .common import start_generation
from .generation import ChoiceSpec, Generation
from .state import ServerState

GROUP_HEADER = "x-mlxrun-group"
FIM_PRIORITY = 1
_TRACKED_PER_CLIENT = 64  # remembered in-flight requests per client: a bound against leaks

# ---------------------------------------------------------------- cancellation groups


def same_lineage(a: str, b: str) -> bool:
    """Whether two prefixes are one typing run apart (see the module docstring)."""
    short, long = (a, b) if len(a) <= len(b) else (b, a)
    end = len(short)
    while end and not short[end - 1].isspace():
        end -= 1
    return long.startswith(short[:end] or short)


@dataclass(eq=False)
class Ticket:
    """A FIM request's group; release() once its response has ended."""

    group: str | None
    prefix: str = ""
    suffix: str = ""
    client: str = ""
    owner: FimGroups | None = field(default=None, repr=False)

    def release(self) -> None:
        if self.owner is not None:
            self.owner.drop(self)
            self.owner = None


NO_GROUP = Ticket(None)


class FimGroups:
    """In-flight FIM requests per client, to find the group a new request belongs to."""

    def __init__(self) -> None:
        self._live: dict[str, list[Ticket]] = {}
        self._made = 0

    def claim(self, client: str, header: str | None, prefix: str, suffix: str) -> Ticket:
        if header:
            return Ticket(f"fim:{client}:header:{header}")
        live = self._live.setdefault(client, [])
        for older in reversed(live):
            if older.suffix == suffix and same_lineage(older.prefix, prefix):
                group = older.group
                break
        else:
            self._made += 1
            group = f"fim:{client}:lineage:{self._made}"
        ticket = Ticket(group, prefix, suffix, client, self)
        live.append(ticket)
        del live[:-_TRACKED_PER_CLIENT]
        return ticket

    def drop(self, ticket: Ticket) -> None:
        live = self._live.get(ticket.client, [])
        if ticket in live:
            live.remove(ticket)
        if not live:
            self._live.pop(ticket.client, None)

    def in_flight(self) -> int:
        return sum(len(v) for v in self._live.values())


def fim_groups(request: Request) -> FimGroups:
    """The app's registry, made on first use and kept on app.state beside the ServerState."""
    groups = getattr(request.app.state, "fim_groups", None)
    if groups is None:
        groups = request.app.state.fim_groups = FimGroups()
    return groups


def client_id(request: Request) -> str:
    """Whose groups a request may join: its API key's principal (server/auth.py), so one key
    never cancels another's requests; without auth, a digest of whatever key the client sends
    (group ids live on in the engine and must not carry keys)."""
    who = auth.principal(request)
    if who is not auth.ANONYMOUS:
        return auth.owner(request)
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    key = (token.strip() if scheme.lower() == "bearer" else "") or request.headers.get("x-api-key")
    return hashlib.sha256((key or "").encode("utf-8")).hexdigest()[:16]


def start_fim(
    state: ServerState,
    request: Request,
    specs: Sequence[ChoiceSpec],
    request_id: str,
    arrival: float,
    cursor: tuple[str, str] | None,
    priority: int = FIM_PRIORITY,
) -> tuple[Generation, Ticket]:
    """Submit FIM choices at `priority`; with the (prefix, suffix) `cursor`, in a group."""
    ticket = NO_GROUP
    if cursor is not None:
        header = request.headers.get(GROUP_HEADER)
        ticket = fim_groups(request).claim(client_id(request), header, *cursor)
    specs = [replace(s, priority=priority, group=ticket.group) for s in specs]
    try:
        return start_generation(state, specs, request_id, arrival), ticket
    except BaseException:
        ticket.release()
        raise


async def released(
    stream: AsyncIterator[bytes], ticket: Ticket, skip: bytes | None = None
) -> AsyncIterator[bytes]:
    """`stream` without `skip` frames, releasing `ticket` when it ends or the client leaves."""
    try:
        async for frame in stream:
            if frame != skip:
                yield frame
    finally:
        ticket.release()
        await stream.aclose()  # type: ignore[attr-defined]
