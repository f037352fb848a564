"""models.toml's default sampling, applied to a request body before it is parsed: each field the
client left out is filled in under the name the request's dialect uses, so a request's own values
always win and the parsers see nothing they do not know."""

from __future__ import annotations

from typing import Any

# Per path: models.toml's field -> the body's (None: the dialect has no such field).
_OPENAI = {k: k for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                          "presence_penalty", "frequency_penalty", "max_tokens", "seed")}  # fmt: skip
_RESPONSES = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
              "seed": "seed", "max_tokens": "max_output_tokens"}  # fmt: skip
_ANTHROPIC = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k"}
_OLLAMA = {**_OPENAI, "max_tokens": "num_predict", "repetition_penalty": "repeat_penalty"}
_FIELDS = {"/v1/chat/completions": _OPENAI, "/v1/completions": _OPENAI,
           "/v1/responses": _RESPONSES, "/v1/messages": _ANTHROPIC}  # fmt: skip
_OLLAMA_PATHS = ("/api/chat", "/api/generate")
# A client's own output limit under another name: no default max_tokens next to it.
_LIMITS = ("max_tokens", "max_completion_tokens")


def apply_defaults(body: Any, path: str, sampling: dict[str, Any]) -> None:
    """Fill `body` (a parsed JSON request for `path`) with `sampling` where it says nothing."""
    if not sampling or not isinstance(body, dict):
        return
    if path in _OLLAMA_PATHS:
        options = body.get("options")
        if options is None:
            options = body["options"] = {}
        if isinstance(options, dict):  # anything else is the parser's 400 to give
            for key, value in sampling.items():
                options.setdefault(_OLLAMA[key], value)
        return
    fields = _FIELDS.get(path)
    if fields is None:
        return
    for key, value in sampling.items():
        name = fields.get(key)
        if name is None or (key == "max_tokens" and any(k in body for k in _LIMITS)):
            continue
        body.setdefault(name, value)
