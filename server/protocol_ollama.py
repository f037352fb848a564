"""Ollama request bodies (/api/chat, /api/generate) -> validated request objects carrying
SamplingParams; the routes are in routes/ollama.py.

Options: Ollama's documented defaults apply (temperature 0.8, top_k 40, top_p 0.9, repeat_penalty
1.1 over repeat_last_n 64); num_predict <= 0 means "until the context is full", seed < 0 a random
seed. Runner options (num_ctx, num_gpu, num_thread, use_mmap...) are type-checked and ignored: the
context length and memory are fixed when the server starts, and /api/show and /api/ps report them.
typical_p, tfs_z, mirostat*, penalize_newline and num_keep are type-checked and ignored (no such
samplers here). Unknown fields and option names are ignored, as Ollama ignores them; a wrong type
is a 400. Both kinds of ignored field are reported (server/extras.py); `serve --strict` refuses the
unknown ones.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mlxrun.errors import InvalidRequestError
from mlxrun.sampling import SamplingParams

from .errors import APIError, from_mlxrun, invalid
from .extras import Extras
from .protocol import check_kind, optional
from .protocol_tools import (
    OutputFormat,
    ToolChoice,
    assistant_call,
    check_unique,
    function_tool,
    parse_openai_tool_choice,
)

DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "repetition_penalty": 1.1}
MAX_PARAM = "num_predict"  # the field named in context-length errors

_FLOAT, _INT, _BOOL = "number", "integer", "boolean"
_USED = {"temperature": _FLOAT, "top_p": _FLOAT, "top_k": _INT, "min_p": _FLOAT, "seed": _INT,
         "num_predict": _INT, "repeat_penalty": _FLOAT, "repeat_last_n": _INT,
         "presence_penalty": _FLOAT, "frequency_penalty": _FLOAT}  # fmt: skip
_IGNORED = {"num_ctx": _INT, "num_batch": _INT, "num_gpu": _INT, "main_gpu": _INT,
            "num_thread": _INT, "num_keep": _INT, "numa": _BOOL, "low_vram": _BOOL,
            "f16_kv": _BOOL, "logits_all": _BOOL, "vocab_only": _BOOL, "use_mmap": _BOOL,
            "use_mlock": _BOOL, "embedding_only": _BOOL, "typical_p": _FLOAT, "tfs_z": _FLOAT,
            "mirostat": _INT, "mirostat_tau": _FLOAT, "mirostat_eta": _FLOAT,
            "penalize_newline": _BOOL}  # fmt: skip
_RENAMED = {"repeat_penalty": "repetition_penalty"}
_SHARED_KEYS = ("model", "format", "options", "stream", "keep_alive", "think", "logprobs",
                "top_logprobs")  # fmt: skip
_CHAT_KEYS = frozenset({*_SHARED_KEYS, "messages", "tools", "tool_choice"})
_GENERATE_KEYS = frozenset({*_SHARED_KEYS, "prompt", "suffix", "system", "raw", "images",
                            "template", "context"})  # fmt: skip
_MESSAGE_KEYS = ("role", "content", "images", "tool_calls", "thinking", "tool_name", "name",
                 "tool_call_id")  # fmt: skip
_UNLOAD = (0, "0", "0s", "0m")  # keep_alive values that ask Ollama to unload the model


@dataclass(frozen=True)
class OllamaRequest:
    """What /api/chat and /api/generate share."""

    params: SamplingParams  # max_tokens None: whatever the context leaves
    output: OutputFormat | None  # `format`
    stream: bool
    template_kwargs: dict[str, Any]  # from `think`
    unload: bool  # keep_alive 0: with nothing to generate, the caller asks for an unload
    ignored: list[str]  # fields accepted but not acted on


@dataclass(frozen=True)
class OllamaChat(OllamaRequest):
    messages: list[dict[str, Any]]  # the neutral shape the chat template reads
    tools: list[dict[str, Any]] | None
    tool_choice: ToolChoice  # an mlxrun extension; Ollama has no such field


@dataclass(frozen=True)
class OllamaGenerate(OllamaRequest):
    prompt: str
    suffix: str  # non-empty: a fill-in-the-middle request (the prompt is the text before it)
    system: str
    raw: bool  # the prompt as is, no chat template


def rfc3339(at: dt.datetime | None = None) -> str:
    """A timestamp as Ollama writes them (UTC, microseconds, Z)."""
    at = at or dt.datetime.now(dt.timezone.utc)
    return at.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def served_model(model_ids: Sequence[str], name: Any) -> str:
    """The served id for an Ollama model name ("tiny:latest" is "tiny"); otherwise a 404 listing
    what this server serves. Names are only compared with the served ones: a path, a registry
    name or a URL is never opened, stat'ed or fetched because a request sent it."""
    if not name:
        raise invalid("model is required", "model")
    check_kind(name, "string", "model")
    for candidate in (name, name.removesuffix(":latest")):
        if candidate in model_ids:
            return candidate
    found = next((i for i in model_ids if i.removesuffix(":latest") == name), None)
    if found is None:
        names = ", ".join(tagged(i) for i in model_ids)
        raise APIError(404, f"model '{name}' not found; this server serves: {names}",
                       param="model", code="model_not_found")  # fmt: skip
    return found


def tagged(model_id: str) -> str:
    """Ollama's name for a model: with a tag, `:latest` when it has none."""
    return model_id if ":" in model_id.rsplit("/", 1)[-1] else f"{model_id}:latest"


def _unknown(path: str) -> APIError:
    return invalid(f'json: unknown field "{path}"', path)


def parse_chat(body: Mapping[str, Any], context_length: int, strict: bool = False) -> OllamaChat:
    extras = Extras(strict)
    extras.check(body, _CHAT_KEYS, _unknown)
    checked = _common(body)
    messages = _messages(optional(body, "messages", "array", []), extras)
    tools = _tools(body)
    choice = parse_openai_tool_choice(body, tools)
    shared = _shared(body, context_length, checked, extras)
    return OllamaChat(**shared, messages=messages, tools=tools, tool_choice=choice)


def parse_generate(
    body: Mapping[str, Any], context_length: int, strict: bool = False
) -> OllamaGenerate:
    extras = Extras(strict)
    extras.check(body, _GENERATE_KEYS, _unknown)
    checked = _common(body)
    prompt, suffix = (optional(body, k, "string", "") for k in ("prompt", "suffix"))
    system = optional(body, "system", "string", "")
    raw = optional(body, "raw", _BOOL, False)
    _no_images(optional(body, "images", "array"), "images")
    if optional(body, "template", "string"):
        raise invalid(
            "'template' (an Ollama Go template) is not supported: the model's own chat template "
            "is used. Send raw: true with a prompt you have formatted yourself.",
            "template",
        )
    if optional(body, "context", "array"):
        raise invalid(
            "'context' (deprecated in Ollama) is not supported; send the conversation to "
            "/api/chat as messages.",
            "context",
        )
    if raw and system:
        raise invalid("raw mode does not support 'system'; put it in the prompt.", "system")
    shared = _shared(body, context_length, checked, extras)
    return OllamaGenerate(**shared, prompt=prompt, suffix=suffix, system=system, raw=raw)


def _shared(
    body: Mapping[str, Any],
    context_length: int,
    checked: tuple[bool, dict[str, Any]],
    extras: Extras,
) -> dict[str, Any]:
    """The OllamaRequest fields; `checked` is what _common found (stream, template kwargs)."""
    stream, template_kwargs = checked
    return {
        "params": _options(body, context_length, extras),
        "output": _format(body),
        "stream": stream,
        "template_kwargs": template_kwargs,
        "unload": body.get("keep_alive") in _UNLOAD,
        "ignored": extras.paths,
    }


def _options(body: Mapping[str, Any], context_length: int, extras: Extras) -> SamplingParams:
    options = optional(body, "options", "object", {})
    given: dict[str, Any] = {}
    for key, value in options.items():
        kind = _USED.get(key) or _IGNORED.get(key)
        if value is not None and kind is None and key != "stop":
            extras.unknown(f"options.{key}", _unknown(f"options.{key}"))
        if value is None or (kind is None and key != "stop"):
            continue  # Ollama ignores options it does not know
        if key in _IGNORED:
            extras.ignore(f"options.{key}")
        if key == "stop":
            stops = (
                [value] if isinstance(value, str) else check_kind(value, "array", "options.stop")
            )
            for s in stops:
                check_kind(s, "string", "options.stop")
            given["stop"] = tuple(stops)
            continue
        check_kind(value, kind, f"options.{key}")
        if key in _USED:
            given[_RENAMED.get(key, key)] = value
    params = {**DEFAULTS, **given}
    predict = params.pop("num_predict", 0)
    params["max_tokens"] = predict if predict > 0 else None
    seed = params.get("seed")
    if seed is not None and seed < 0:
        params["seed"] = None  # -1: a random seed, as in Ollama
    last_n = params.pop("repeat_last_n", 64)
    if last_n == 0:
        params["repetition_penalty"] = 1.0
    else:
        params["repetition_context_size"] = context_length if last_n < 0 else last_n
    logprobs = optional(body, "logprobs", _BOOL, False)
    try:
        return SamplingParams(
            **params, logprobs=logprobs, top_logprobs=optional(body, "top_logprobs", _INT, 0)
        )
    except InvalidRequestError as e:
        raise from_mlxrun(e) from None


def _format(body: Mapping[str, Any]) -> OutputFormat | None:
    fmt = body.get("format")
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return OutputFormat("json_object", param="format")
    if isinstance(fmt, dict):
        return OutputFormat("json_schema", schema=fmt, param="format")
    raise invalid("'format' must be \"json\" or a JSON schema object.", "format")


def _common(body: Mapping[str, Any]) -> tuple[bool, dict[str, Any]]:
    """(stream, chat template kwargs from `think`), after checking the fields every call shares."""
    keep_alive = body.get("keep_alive")
    if keep_alive is not None and (
        isinstance(keep_alive, bool) or not isinstance(keep_alive, (str, int, float))
    ):
        raise invalid("'keep_alive' must be a duration (\"5m\") or seconds.", "keep_alive")
    think = body.get("think")
    kwargs: dict[str, Any] = {}
    if isinstance(think, bool):
        kwargs["enable_thinking"] = think
    elif think in ("low", "medium", "high"):
        kwargs.update(enable_thinking=True, reasoning_effort=think)
    elif think is not None:
        raise invalid('\'think\' must be true, false, "low", "medium" or "high".', "think")
    return optional(body, "stream", _BOOL, True), kwargs


def _no_images(images: Any, where: str) -> None:
    if images:
        raise invalid(f"'{where}': this model takes text only; images are not supported.", where)


def _tools(body: Mapping[str, Any]) -> list[dict] | None:
    raw = optional(body, "tools", "array")
    tools = []
    for i, item in enumerate(raw or ()):
        where = f"tools[{i}]"
        check_kind(item, "object", where)
        if item.get("type", "function") != "function":
            raise invalid(f"'{where}.type' must be 'function'.", f"{where}.type")
        fn = check_kind(item.get("function"), "object", f"{where}.function")
        tools.append(
            function_tool(fn.get("name"), fn.get("description"), fn.get("parameters"), where)
        )
    check_unique(tools, "tools")
    return tools or None


def _messages(raw: list, extras: Extras) -> list[dict[str, Any]]:
    """Ollama messages in the neutral shape. Ollama's calls carry no ids: each gets one, and a
    tool result answers the call it names (tool_call_id, else tool_name), else the oldest open."""
    out: list[dict[str, Any]] = []
    open_calls: list[tuple[str, str]] = []
    for i, m in enumerate(raw):
        at = f"messages[{i}]"
        check_kind(m, "object", at)
        extras.check(m, _MESSAGE_KEYS, _unknown, at)
        role = check_kind(m.get("role"), "string", f"{at}.role").lower()
        if role not in ("system", "user", "assistant", "tool"):
            raise invalid(f"'{at}.role' must be system, user, assistant or tool.", f"{at}.role")
        _no_images(m.get("images"), f"{at}.images")
        msg: dict[str, Any] = {"role": role, "content": optional(m, "content", "string", "")}
        calls = optional(m, "tool_calls", "array")
        if calls and role != "assistant":
            raise invalid(f"Only assistant messages carry tool calls ({at}).", f"{at}.tool_calls")
        if role == "assistant":
            thinking = optional(m, "thinking", "string")
            if thinking:
                msg["reasoning_content"] = thinking  # the field chat templates read
            if calls:
                msg["tool_calls"] = [
                    _call(c, f"{at}.tool_calls[{j}]", f"call_{i}_{j}") for j, c in enumerate(calls)
                ]
                open_calls += [(c["id"], c["function"]["name"]) for c in msg["tool_calls"]]
        if role == "tool":
            _answer(m, msg, open_calls, f"call_{i}")
        out.append(msg)
    return out


def _answer(
    m: Mapping[str, Any], msg: dict, open_calls: list[tuple[str, str]], fallback: str
) -> None:
    """Link a tool result to the call it answers (removing that call from `open_calls`)."""
    name = optional(m, "tool_name", "string") or optional(m, "name", "string")
    call_id = optional(m, "tool_call_id", "string")
    if call_id:
        match = next((c for c in open_calls if c[0] == call_id), None)
    else:
        match = next((c for c in open_calls if c[1] == name), open_calls[0] if open_calls else None)
    if match is not None:
        open_calls.remove(match)
    msg["tool_call_id"] = call_id or (match[0] if match else fallback)
    if name or match:
        msg["name"] = name or match[1]


def _call(call: Any, at: str, default_id: str) -> dict[str, Any]:
    check_kind(call, "object", at)
    fn = check_kind(call.get("function"), "object", f"{at}.function")
    name = check_kind(fn.get("name"), "string", f"{at}.function.name")
    call_id = call.get("id") if isinstance(call.get("id"), str) else default_id
    return assistant_call(call_id, name, fn.get("arguments") or {}, f"{at}.function.arguments")
