"""/tokenize and /detokenize bodies (vLLM's, with llama.cpp's names for the same fields)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import invalid
from .extras import Extras
from .protocol import check_kind, optional, parse_message, required, unrecognized


@dataclass(frozen=True)
class TokenizeRequest:
    model: str | None
    prompt: str | None  # exactly one of prompt and messages
    messages: list[dict[str, Any]] | None
    add_special_tokens: bool = True
    with_pieces: bool = False  # llama-server: each id with its text piece
    ignored: list[str] = field(default_factory=list)


def parse_tokenize(body: Mapping[str, Any], *, strict: bool = False) -> TokenizeRequest:
    """vLLM's /tokenize body; llama.cpp's names for the same (content, add_special) work too."""
    extras = Extras(strict)
    allowed = {
        "model",
        "prompt",
        "messages",
        "add_special_tokens",
        "content",
        "add_special",
        "with_pieces",
    }
    extras.check(body, allowed, unrecognized)
    model = optional(body, "model", "string")
    prompt = optional(body, "prompt", "string")
    content = optional(body, "content", "string")
    if prompt is not None and content is not None:
        raise invalid("Pass one of 'content' and 'prompt', not both.", "content")
    prompt = content if prompt is None else prompt
    messages = optional(body, "messages", "array")
    if (prompt is None) == (messages is None):
        raise invalid("Pass exactly one of 'prompt' and 'messages'.", "prompt")
    if messages is not None:
        messages = [parse_message(m, i, extras) for i, m in enumerate(messages)]
        if not messages:
            raise invalid("'messages' must contain at least one message.", "messages")
    add = optional(body, "add_special_tokens", "boolean")
    if add is None:
        add = optional(body, "add_special", "boolean", True)
    pieces = optional(body, "with_pieces", "boolean", False)
    return TokenizeRequest(model, prompt, messages, add, pieces, extras.paths)


def parse_detokenize(
    body: Mapping[str, Any], *, strict: bool = False
) -> tuple[str | None, list[int], list[str]]:
    """(model, token ids, ignored fields)."""
    extras = Extras(strict)
    extras.check(body, ("model", "tokens"), unrecognized)
    model = optional(body, "model", "string")
    tokens = required(body, "tokens", "array")
    for t in tokens:
        check_kind(t, "integer", "tokens")
    return model, tokens, extras.paths
