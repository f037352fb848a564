"""Server-sent events as OpenAI frames them: `data: {json}\\n\\n` per chunk, `data: [DONE]` last.

EventStreamResponse watches for the client going away while it streams; when it does, the chunk
iterator is cancelled and closed at once (not at the next write), so its `finally` can abort the
engine requests behind it and free their slots.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

DONE = b"data: [DONE]\n\n"


def event(data: Any) -> bytes:
    """One SSE frame. Compact JSON, UTF-8 kept as is (as OpenAI sends it)."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return b"data: " + text.encode("utf-8") + b"\n\n"


class EventStreamResponse(Response):
    media_type = "text/event-stream"

    def __init__(self, chunks: AsyncIterator[bytes], headers: dict[str, str] | None = None):
        self.chunks = chunks
        self.status_code = 200
        self.background = None
        # Proxies (nginx) must not buffer the stream; clients must not cache it.
        self.init_headers(
            {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})}
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as group:

            async def watch() -> None:
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        group.cancel_scope.cancel()
                        return

            group.start_soon(watch)
            try:
                await self._stream(send)
            except OSError:
                pass  # the client went away between two writes
            finally:
                group.cancel_scope.cancel()
                with anyio.CancelScope(shield=True):
                    aclose = getattr(self.chunks, "aclose", None)
                    if aclose is not None:
                        await aclose()

    async def _stream(self, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        async for chunk in self.chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
