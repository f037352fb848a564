"""What every route needs: the engine, the tokenizer, the settings and the counters.

One ServerState per app (on `app.state.server`), never module globals.
"""

from __future__ import annotations

import fnmatch
import functools
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from . import errors
from .errors import APIError
from .metrics import Metrics
from .protocol import parse_json
from .tokens import TokenTexts

DEFAULT_MAX_BODY = 32 << 20  # 32 MiB: a 128k-token prompt as JSON token ids is ~1 MB
# Probes that must work without the key: health checks, and Ollama clients asking "is it running?".
OPEN_PATHS = frozenset({"/health", "/"})


@dataclass(frozen=True)
class ServerConfig:
    """HTTP-side settings. `model_id` is what clients send as "model"; aliases work too."""

    model_id: str
    context_length: int
    aliases: tuple[str, ...] = ()
    max_output_tokens: int | None = None  # None: whatever the context leaves
    api_key: str | None = None  # authenticates as the principal "default"
    api_keys: tuple[tuple[str, str], ...] = ()  # (name, key) pairs
    api_key_file: str | None = None  # `name:key` lines, re-read on SIGHUP (server/auth.py)
    max_concurrent_per_key: int | None = None  # generation requests at once per key
    max_queued_per_key: int | None = None  # more waiting per key; past it a 429
    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = DEFAULT_MAX_BODY
    owned_by: str = "mlxrun"
    tool_parser: str | None = (
        None  # a mlxrun.parsing.tools format name; None: detected from the model
    )
    # OpenAI's rules to the letter: unknown fields and a max_tokens past the context are 400s.
    strict: bool = False
    responses_dir: str | None = None  # stored Responses API responses persist here
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def model_ids(self) -> tuple[str, ...]:
        """The ids /v1/models lists: the model's and its plain aliases (not the patterns)."""
        plain = (a for a in self.aliases if a != self.model_id and not _is_pattern(a))
        return (self.model_id, *plain)

    def serves(self, name: str) -> bool:
        """Whether `name` means this model: an id, an alias pattern ("claude-*": Claude Code
        asks for its own model names), or Ollama's tag form "id:latest"."""
        for candidate in (name, name.removesuffix(":latest")):
            if candidate in self.model_ids:
                return True
        return any(_is_pattern(a) and fnmatch.fnmatchcase(name, a) for a in self.aliases)


class ServerState:
    """The engine, tokenizer, config and counters one app serves with."""

    def __init__(self, engine: Any, tokenizer: Any, config: ServerConfig):
        self.engine = engine
        self.tokenizer = tokenizer
        self.config = config
        self.metrics = Metrics()
        self.token_texts = TokenTexts(tokenizer)
        self.ready = False
        self.load_error: BaseException | None = None
        self.on_fatal: Any = None  # called with the error if the engine fails to start
        self.on_ready: Any = None  # awaited once the engine has started
        self._ids = 0
        self._grammars: Any = None

    @property
    def grammars(self) -> Any:
        """The model's mlxrun.constrain.GrammarCompiler (its token trie is built on first use)."""
        if self._grammars is None:
            from mlxrun.constrain import GrammarCompiler

            self._grammars = GrammarCompiler(self.tokenizer)
        return self._grammars

    @functools.cached_property
    def tool_format(self) -> Any:
        """How this model writes tool calls (mlxrun.parsing.tools.ToolFormat), or None."""
        from mlxrun.parsing import tools

        if self.config.tool_parser:
            return tools.tool_format_by_name(self.config.tool_parser, self.tokenizer)
        return tools.detect_tool_format(self.tokenizer)

    @functools.cached_property
    def responses(self) -> Any:
        """Stored /v1/responses responses (server/responses_store.py)."""
        from .responses_store import ResponseStore

        return ResponseStore(self.config.responses_dir)

    @functools.cached_property
    def reasoning_format(self) -> Any:
        """How this model marks reasoning (mlxrun.parsing.reasoning.ReasoningFormat), or None."""
        from mlxrun.parsing.reasoning import detect_reasoning

        return detect_reasoning(self.tokenizer)

    def check_model(self, name: str) -> str:
        """The name as the client sent it when we serve it; 404 otherwise. Ollama's tag form
        "id:latest" names the same model (clients that list /api/tags send it back)."""
        if not self.config.serves(name):
            raise errors.model_not_found(name, self.config.model_ids)
        return name

    def check_ready(self) -> None:
        if self.load_error is not None:
            raise APIError(
                503,
                f"The model failed to start: {self.load_error}",
                type=errors.SERVER,
                code="model_failed",
            )
        if not self.ready:
            raise errors.loading()
        if not self.engine.is_alive:
            raise APIError(503, "The engine has stopped", type=errors.SERVER, code="engine_stopped")

    def next_id(self, prefix: str) -> str:
        self._ids += 1
        return f"{prefix}-{self._ids:x}{time.time_ns() & 0xFFFFFFFF:08x}"

    async def read_json(self, request: Request) -> dict[str, Any]:
        """The body as a JSON object; 413 past max_body_bytes (checked while reading)."""
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _too_large(limit)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
        return parse_json(b"".join(chunks))


def _is_pattern(alias: str) -> bool:
    return any(c in alias for c in "*?[")


def _too_large(limit: int) -> APIError:
    return APIError(
        413,
        f"The request body is larger than the server's limit of {limit} bytes.",
        code="request_too_large",
    )


def server_state(request: Request) -> ServerState:
    return request.app.state.server
