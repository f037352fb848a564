"""Fields a request carries that this server does not act on: noted and reported, not refused.

Every local server editors talk to (llama-server, vLLM, Ollama, LM Studio, mlx_lm.server) accepts
fields it does not know, and clients send them: llama.cpp's id_slot, provider extensions, extra
keys inside messages. A server that refuses them breaks the client, so by default an unknown field
is noted in an `Extras` while the body is parsed, and the route reports it: the response header
X-Mlxrun-Ignored-Fields (comma-separated dotted paths), a debug log line and a /metrics counter.
`mlxrun serve --strict` (ServerConfig.strict) refuses them instead, with the dialect's own 400.

Fields we know and honour are not noted; fields we know but cannot honour stay a 400 naming them
in both modes (the parsers decide that). A known field with no effect here (an Ollama runner
option, Anthropic's context_management) is noted with `ignore` and never refused.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import Response

from .errors import APIError

log = logging.getLogger("mlxrun.server")

HEADER = "X-Mlxrun-Ignored-Fields"
MAX_REPORTED = 32  # paths named in the header; a body with thousands of keys gets no huge header
MAX_PATH = 120  # characters of one path in the header
_INDEX = re.compile(r"\[(\d+)\]")


class Extras:
    """The ignored fields of one request body, as dotted paths ("messages.0.extra_field")."""

    def __init__(self, strict: bool = False):
        self.strict = strict
        self.paths: list[str] = []

    def unknown(self, path: str, error: APIError) -> None:
        """A field this server does not know: noted, or `error` raised under --strict."""
        if self.strict:
            raise error
        self.ignore(path)

    def ignore(self, path: str) -> None:
        """A field that has no effect here (known or not): noted, never refused."""
        dotted = _INDEX.sub(r".\1", path)
        if dotted not in self.paths:
            self.paths.append(dotted)

    def check(
        self,
        obj: Mapping[str, Any],
        allowed: Iterable[str],
        error: Callable[[str], APIError],
        where: str = "",
    ) -> None:
        """Note every member of `obj` outside `allowed` (nulls count as absent); `error(path)`
        is the 400 --strict answers with."""
        allowed = frozenset(allowed)
        for name, value in obj.items():
            if name not in allowed and value is not None:
                path = f"{where}.{name}" if where else name
                self.unknown(path, error(path))


def header_value(paths: Iterable[str]) -> str:
    """The header's value: percent-encoded paths (a field name may hold any character, a header
    only Latin-1 without commas), at most MAX_REPORTED of them."""
    items = list(paths)
    named = [quote(p[:MAX_PATH], safe="._-~:@$[]/") for p in items[:MAX_REPORTED]]
    if len(items) > MAX_REPORTED:
        named.append(f"...{len(items) - MAX_REPORTED}-more")
    return ",".join(named)


def metric_label(path: str) -> str:
    """The path without array indices, so that the counter's labels stay few."""
    return ".".join(part for part in path.split(".") if not part.isdigit())[:MAX_PATH]


def note(request: Request, paths: list[str]) -> None:
    """Record the ignored fields of this request: counted and logged now, named in the response
    header by `reports`."""
    if not paths:
        return
    request.state.ignored_fields = paths
    state = request.app.state.server
    state.metrics.count_ignored(metric_label(p) for p in paths)
    log.debug("%s %s: ignored fields %s", request.method, request.url.path, ", ".join(paths))


def reports(
    handler: Callable[[Request], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    """An endpoint whose response names the fields `note` recorded."""

    @functools.wraps(handler)
    async def endpoint(request: Request) -> Response:
        response = await handler(request)
        paths = getattr(request.state, "ignored_fields", None)
        if paths:
            response.headers[HEADER] = header_value(paths)
        return response

    return endpoint
