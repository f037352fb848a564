"""One record per HTTP request: its id, dialect, token counts and max_tokens clamp, and the access
log line written from it when the response is done.

The record lives in a context variable that AccessMiddleware (server/app.py) sets for each
request, so code deep in a route (the budget rule, the usage count) can add to it without being
handed the request. It is a mutable object: worker threads (`in_thread`) and tasks run in copies
of the context and write to the same record.

    INFO mlxrun.access: req_3f2a… POST /v1/chat/completions 200 prompt=31 completion=8 0.412s
"""

from __future__ import annotations

import contextvars
import logging
import secrets
from dataclasses import dataclass

access_log = logging.getLogger("mlxrun.access")

OPENAI, ANTHROPIC, OLLAMA, LLAMA_CPP = "openai", "anthropic", "ollama", "llama.cpp"
# Ollama's API lives under /api/ (and "/": its "is it running?" probe).
_OLLAMA_PREFIX = "/api/"
_ANTHROPIC_PREFIX = "/v1/messages"


def dialect(path: str) -> str:
    """Which API family a path belongs to: its errors are written in that family's shape."""
    if path == _ANTHROPIC_PREFIX or path.startswith(_ANTHROPIC_PREFIX + "/"):
        return ANTHROPIC
    if path.startswith(_OLLAMA_PREFIX):
        return OLLAMA
    if path == "/infill":  # llama-server's: its errors look like OpenAI's, its rules do not
        return LLAMA_CPP
    return OPENAI


@dataclass
class RequestRecord:
    id: str = ""
    method: str = ""
    path: str = ""
    dialect: str = OPENAI
    status: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    clamp: str | None = None  # "requested->granted" when max_tokens was cut to what fits
    principal: str = ""  # the API key's name (server/auth.py), never the key

    def line(self, seconds: float) -> str:
        tokens = ""
        if self.prompt_tokens or self.completion_tokens:
            tokens = f" prompt={self.prompt_tokens} completion={self.completion_tokens}"
        clamp = f" max_tokens={self.clamp}" if self.clamp else ""
        key = f" key={self.principal}" if self.principal else ""
        return (
            f"{self.id} {self.method} {self.path} {self.status}{key}{tokens}{clamp} {seconds:.3f}s"
        )


_current: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar(
    "mlxrun_request", default=None
)


def new_id() -> str:
    return "req_" + secrets.token_hex(12)


def begin(method: str, path: str) -> tuple[RequestRecord, contextvars.Token]:
    record = RequestRecord(new_id(), method, path, dialect(path))
    return record, _current.set(record)


def end(token: contextvars.Token) -> None:
    _current.reset(token)


def current() -> RequestRecord:
    """This request's record; a throwaway one outside a request (tests calling helpers directly)."""
    record = _current.get()
    return record if record is not None else RequestRecord()
