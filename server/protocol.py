"""OpenAI request bodies -> validated request objects carrying SamplingParams.

Known fields are checked the way OpenAI checks them: wrong types and out-of-range values are 400s
naming the parameter. Fields we do not know are accepted and reported (server/extras.py: a response
header, a log line, a counter), as every local server accepts them; `serve --strict` refuses them
with OpenAI's "Unrecognized request argument". Vendor fields that map onto what we do are honoured:
top_k, min_p, repetition_penalty, repetition_context_size (vLLM, llama.cpp, mlx-lm), n_probs
(llama.cpp's logprobs), cache_prompt (the prefix cache is always on), chat_template_kwargs.
Optional fields sent as null count as absent. A few parameters we cannot honour are accepted only at
their no-op value (e.g. store: false) and refused otherwise with "not supported". Tools and
structured output: server/protocol_tools.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mlxrun.errors import InvalidRequestError
from mlxrun.sampling import MAX_TOP_LOGPROBS, SamplingParams

from .errors import APIError, from_mlxrun, invalid
from .extras import Extras
from .protocol_tools import (
    OutputFormat,
    ToolChoice,
    parse_openai_calls,
    parse_openai_response_format,
    parse_openai_tool_choice,
    parse_openai_tools,
)

MAX_N = 128  # OpenAI's limit on n
MAX_CHOICES = 128  # prompts x n for one /v1/completions call
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for /v1/completions logprobs
MAX_TEMPERATURE = 2

_ROLES = ("system", "developer", "user", "assistant", "tool", "function")
_MESSAGE_KEYS = frozenset({"role", "content", "name", "tool_calls", "function_call", "refusal",
                           "tool_call_id", "reasoning_content"})  # fmt: skip

# Sampling fields passed straight to SamplingParams (which validates them and names the field).
_SAMPLING = (
    "temperature", "top_p", "presence_penalty", "frequency_penalty", "seed",
    # Extensions most local servers accept (vLLM, llama.cpp).
    "top_k", "min_p", "repetition_penalty", "repetition_context_size",
)  # fmt: skip
_COMMON = frozenset({"model", "n", "stream", "stream_options", "stop", "logit_bias", "user",
                     "max_tokens", "n_probs", "cache_prompt", *_SAMPLING})  # fmt: skip
_FORMAT = frozenset({"response_format", "grammar"})
_CHAT = _COMMON | _FORMAT | {"messages", "max_completion_tokens", "logprobs", "top_logprobs",
    "tools", "functions", "tool_choice", "function_call", "parallel_tool_calls",
    "reasoning_effort", "chat_template_kwargs"}  # fmt: skip
_COMPLETION = _COMMON | _FORMAT | {"prompt", "suffix", "echo", "logprobs", "best_of"}

# Parameters we accept only at a value that asks for nothing we do not do.
_NOOP_VALUES: dict[str, Callable[[Any], bool]] = {
    "modalities": lambda v: v == ["text"],
    "store": lambda v: v is False,
    "metadata": lambda v: isinstance(v, dict),  # tags for stored completions: nothing to do
    "service_tier": lambda v: v in ("auto", "default"),
}


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: list[dict[str, Any]]  # roles and plain-text content, ready for the chat template
    params: SamplingParams  # max_tokens None: whatever the context leaves
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    max_tokens_param: str = "max_tokens"  # the field the client used, for error messages
    tools: list[dict[str, Any]] | None = None
    tool_choice: ToolChoice = ToolChoice("none")
    output: OutputFormat | None = None  # response_format / grammar
    template_kwargs: dict[str, Any] = field(default_factory=dict)  # chat_template_kwargs
    ignored: list[str] = field(default_factory=list)  # fields accepted but not acted on


@dataclass(frozen=True)
class CompletionRequest:
    model: str
    prompts: list[str | list[int]]
    params: SamplingParams
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    logprobs: int | None = None  # alternatives per token (0..5); None: no logprobs
    suffix: str | None = None
    max_tokens_param: str = "max_tokens"
    output: OutputFormat | None = None
    ignored: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- JSON and types


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object; 400 for anything else (bad UTF-8, NaN, deep nesting)."""
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
        # Lone surrogates ("\\ud800") are valid JSON but not text: refuse them here, once.
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except (UnicodeError, ValueError, RecursionError) as e:
        raise invalid(
            f"We could not parse the JSON body of your request ({type(e).__name__}: {e}). "
            "The request body must be a JSON object encoded as UTF-8."
        ) from None
    if not isinstance(body, dict):
        raise invalid(f"The request body must be a JSON object, got {_kind(body)} instead.")
    return body


_EXPECTED = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
}


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def is_kind(value: Any, kind: str) -> bool:
    if isinstance(value, bool) and kind in ("integer", "number"):
        return False
    return isinstance(value, _EXPECTED[kind])


def check_kind(value: Any, kind: str, param: str) -> Any:
    if not is_kind(value, kind):
        article = "an" if kind[0] in "aeiou" else "a"
        raise invalid(
            f"Invalid type for '{param}': expected {article} {kind}, but got {_kind(value)} "
            "instead.",
            param,
            code="invalid_type",
        )
    return value


def optional(body: Mapping[str, Any], name: str, kind: str, default: Any = None) -> Any:
    value = body.get(name)
    return default if value is None else check_kind(value, kind, name)


def required(body: Mapping[str, Any], name: str, kind: str) -> Any:
    if body.get(name) is None:
        raise invalid(
            f"Missing required parameter: '{name}'.", name, code="missing_required_parameter"
        )
    return check_kind(body[name], kind, name)


def unrecognized(name: str) -> APIError:
    return invalid(f"Unrecognized request argument supplied: {name}", name, "unknown_parameter")


def _check_known(body: Mapping[str, Any], allowed: frozenset[str], extras: Extras) -> None:
    for name, value in body.items():
        if name in allowed or value is None:
            continue
        noop = _NOOP_VALUES.get(name)
        if noop is not None and noop(value):
            continue
        if name in _NOOP_VALUES:
            raise invalid(
                f"The parameter '{name}' with this value is not supported by this server.",
                name,
                code="unsupported_parameter",
            )
        extras.unknown(name, unrecognized(name))
    # Our prefix cache is always on: cache_prompt false changes only the speed, not the text.
    if optional(body, "cache_prompt", "boolean", True) is False:
        extras.ignore("cache_prompt")


# ---------------------------------------------------------------- shared fields


def _int_in(body: Mapping[str, Any], name: str, low: int, high: int, default: int) -> int:
    value = optional(body, name, "integer", default)
    if not low <= value <= high:
        raise invalid(f"'{name}' must be between {low} and {high}, got {value}.", name)
    return value


def _max_tokens(body: Mapping[str, Any], names: tuple[str, ...]) -> tuple[int | None, str]:
    """The first of `names` that is set (max_completion_tokens wins over max_tokens)."""
    for name in names:
        value = optional(body, name, "integer")
        if value is not None:
            if value < 1:
                raise invalid(f"'{name}' must be at least 1, got {value}.", name)
            return value, name
    return None, names[-1]


def parse_logit_bias(body: Mapping[str, Any], llama: bool = False) -> dict[int, Any]:
    """OpenAI's {"id": bias}; with `llama`, also llama.cpp's [[id, bias | false], ...], where
    false bans the token (-100, as in OpenAI)."""
    bias = body.get("logit_bias")
    if llama and isinstance(bias, list):
        out: dict[int, Any] = {}
        for pair in bias:
            token, value = pair if isinstance(pair, (tuple, list)) and len(pair) == 2 else (None, 0)
            token = int(token) if isinstance(token, str) and token.isdigit() else token
            if not is_kind(token, "integer"):
                raise invalid("logit_bias entries must be [token id, bias] pairs.", "logit_bias")
            out[token] = -100.0 if value is False else value
        return out
    out = {}
    for key, value in optional(body, "logit_bias", "object", {}).items():
        try:
            token = int(key)
        except ValueError:
            raise invalid(
                f"logit_bias keys must be token ids written as integers, got {key!r}.",
                "logit_bias",
            ) from None
        out[token] = -100.0 if llama and value is False else value
    return out


def parse_stop(body: Mapping[str, Any]) -> tuple[str, ...]:
    """`stop`: one string or an array of strings."""
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    check_kind(stop, "array", "stop")
    for s in stop:
        check_kind(s, "string", "stop")
    return tuple(stop)


def _stream(body: Mapping[str, Any], extras: Extras) -> tuple[bool, bool]:
    stream = optional(body, "stream", "boolean", False)
    options = optional(body, "stream_options", "object")
    if options is None:
        return stream, False
    if not stream:
        raise invalid(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            "stream_options",
        )
    extras.check(options, ("include_usage",), unrecognized, "stream_options")
    return stream, bool(optional(options, "include_usage", "boolean", False))


def _sampling(body: Mapping[str, Any], **extra: Any) -> SamplingParams:
    given = {name: body[name] for name in _SAMPLING if body.get(name) is not None}
    temperature = given.get("temperature")
    if is_kind(temperature, "number") and temperature > MAX_TEMPERATURE:
        raise invalid(
            f"'temperature' must be between 0 and {MAX_TEMPERATURE}, got {temperature}.",
            "temperature",
        )
    try:
        return SamplingParams(
            **given, stop=parse_stop(body), logit_bias=parse_logit_bias(body), **extra
        )
    except InvalidRequestError as e:
        raise from_mlxrun(e) from None
    except (TypeError, OverflowError) as e:  # a value SamplingParams could not even compare
        raise invalid(f"Invalid sampling parameters: {e}") from None


def _model(body: Mapping[str, Any]) -> str:
    return required(body, "model", "string")


# ---------------------------------------------------------------- chat


def _content(content: Any, where: str, extras: Extras) -> str:
    if isinstance(content, str):
        return content
    check_kind(content, "array", where)
    texts = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        check_kind(part, "object", at)
        kind = part.get("type")
        if kind is None:
            raise invalid(f"Missing required parameter: '{at}.type'.", f"{at}.type")
        check_kind(kind, "string", f"{at}.type")
        if kind not in ("text", "refusal"):
            raise invalid(
                f"Content parts of type '{kind}' are not supported by this model; send text.",
                f"{at}.type",
                code="unsupported_content_type",
            )
        text = part.get(kind)
        if not isinstance(text, str):
            raise invalid(f"Missing or invalid '{at}.{kind}': expected a string.", f"{at}.{kind}")
        extras.check(part, ("type", kind), _unknown_field, at)  # cache_control (OpenRouter)...
        texts.append(text)
    return "\n".join(texts)


def _unknown_field(path: str) -> APIError:
    return invalid(f"Unrecognized field: '{path}'.", path, "unknown_parameter")


def parse_message(message: Any, i: int, extras: Extras) -> dict[str, Any]:
    at = f"messages[{i}]"
    check_kind(message, "object", at)
    extras.check(message, _MESSAGE_KEYS, _unknown_field, at)
    role = message.get("role")
    if role is None:
        raise invalid(f"Missing required parameter: '{at}.role'.", f"{at}.role")
    check_kind(role, "string", f"{at}.role")
    if role not in _ROLES:
        raise invalid(
            f"Invalid value for '{at}.role': '{role}'. Supported values are: "
            + ", ".join(f"'{r}'" for r in _ROLES)
            + ".",
            f"{at}.role",
            code="invalid_value",
        )
    content = message.get("content")
    calls = message.get("tool_calls")
    if message.get("function_call") is not None:  # the legacy single call
        legacy = check_kind(message["function_call"], "object", f"{at}.function_call")
        calls = [{"id": "call_0", "type": "function", "function": legacy}]
    if content is None and role != "assistant":
        raise invalid(f"Missing required parameter: '{at}.content'.", f"{at}.content")
    out: dict[str, Any] = {
        # Chat templates know "system" and "tool"; "developer" and "function" are OpenAI's
        # newer and older names for them.
        "role": {"developer": "system", "function": "tool"}.get(role, role),
        "content": "" if content is None else _content(content, f"{at}.content", extras),
    }
    reasoning = optional(message, "reasoning_content", "string")
    if reasoning and role == "assistant":  # DeepSeek-style history; templates read this key
        out["reasoning_content"] = reasoning
    if calls:
        if role != "assistant":
            raise invalid(f"Only assistant messages carry tool calls ({at}).", f"{at}.tool_calls")
        out["tool_calls"] = parse_openai_calls(calls, f"{at}.tool_calls")
    if role in ("tool", "function"):
        call_id = optional(message, "tool_call_id", "string")
        if call_id is None and role == "tool":
            raise invalid(f"Missing required parameter: '{at}.tool_call_id'.", f"{at}.tool_call_id")
        if call_id is not None:
            out["tool_call_id"] = call_id
    name = optional(message, "name", "string")
    if name is not None:
        out["name"] = name
    return out


def _n_probs(body: Mapping[str, Any]) -> int | None:
    """llama.cpp's n_probs: how many alternatives to report per token (OpenAI's top_logprobs)."""
    value = optional(body, "n_probs", "integer")
    if value is not None and not 0 <= value <= MAX_TOP_LOGPROBS:
        raise invalid(
            f"'n_probs' must be between 0 and {MAX_TOP_LOGPROBS}, got {value}.", "n_probs"
        )
    return value or None


def parse_chat(body: Mapping[str, Any], *, strict: bool = False) -> ChatRequest:
    extras = Extras(strict)
    _check_known(body, _CHAT, extras)
    model = _model(body)
    messages = required(body, "messages", "array")
    if not messages:
        raise invalid("'messages' must contain at least one message.", "messages")
    parsed = [parse_message(m, i, extras) for i, m in enumerate(messages)]
    n = _int_in(body, "n", 1, MAX_N, 1)
    stream, include_usage = _stream(body, extras)
    max_tokens, max_param = _max_tokens(body, ("max_completion_tokens", "max_tokens"))
    n_probs = _n_probs(body)
    logprobs = optional(body, "logprobs", "boolean", n_probs is not None)
    top = optional(body, "top_logprobs", "integer", n_probs or 0)
    optional(body, "user", "string")
    params = _sampling(body, max_tokens=max_tokens, logprobs=logprobs, top_logprobs=top)
    tools = parse_openai_tools(body)
    template_kwargs = dict(optional(body, "chat_template_kwargs", "object", {}))
    effort = optional(body, "reasoning_effort", "string")
    if effort is not None and effort not in ("minimal", "low", "medium", "high", "none"):
        raise invalid(f"Invalid value for 'reasoning_effort': '{effort}'.", "reasoning_effort")
    if effort is not None:  # templates that know it read it (gpt-oss); others ignore it
        template_kwargs.setdefault("reasoning_effort", effort)
    return ChatRequest(
        model=model,
        messages=parsed,
        params=params,
        n=n,
        stream=stream,
        include_usage=include_usage,
        max_tokens_param=max_param,
        tools=tools,
        tool_choice=parse_openai_tool_choice(body, tools),
        output=parse_openai_response_format(body),
        template_kwargs=template_kwargs,
        ignored=extras.paths,
    )


# ---------------------------------------------------------------- completions


def _prompts(body: Mapping[str, Any]) -> list[str | list[int]]:
    prompt = body.get("prompt")
    if prompt is None:
        raise invalid(
            "Missing required parameter: 'prompt'.", "prompt", "missing_required_parameter"
        )
    if isinstance(prompt, str):
        return [prompt]
    check_kind(prompt, "array", "prompt")
    if not prompt:
        raise invalid("'prompt' must not be an empty array.", "prompt")
    if all(isinstance(p, str) for p in prompt):
        return list(prompt)
    if all(is_kind(t, "integer") for t in prompt):
        return [list(prompt)]
    if all(isinstance(p, list) for p in prompt):
        for i, ids in enumerate(prompt):
            if not ids or not all(is_kind(t, "integer") for t in ids):
                raise invalid(
                    f"'prompt[{i}]' must be a non-empty array of token ids.", f"prompt[{i}]"
                )
        return [list(p) for p in prompt]
    raise invalid(
        "'prompt' must be a string, an array of strings, an array of token ids or an array "
        "of arrays of token ids.",
        "prompt",
    )


def parse_completion(body: Mapping[str, Any], *, strict: bool = False) -> CompletionRequest:
    extras = Extras(strict)
    _check_known(body, _COMPLETION, extras)
    model = _model(body)
    prompts = _prompts(body)
    n = _int_in(body, "n", 1, MAX_N, 1)
    best_of = optional(body, "best_of", "integer")
    if best_of is not None and best_of != n:
        raise invalid(
            "'best_of' other than n is not supported yet.", "best_of", "unsupported_parameter"
        )
    if len(prompts) * n > MAX_CHOICES:
        raise invalid(
            f"Too many choices: {len(prompts)} prompts x n={n} exceeds {MAX_CHOICES}.", "n"
        )
    stream, include_usage = _stream(body, extras)
    max_tokens, max_param = _max_tokens(body, ("max_tokens",))
    logprobs = optional(body, "logprobs", "integer")
    if logprobs is not None and not 0 <= logprobs <= MAX_COMPLETION_LOGPROBS:
        raise invalid(
            f"'logprobs' must be between 0 and {MAX_COMPLETION_LOGPROBS}, got {logprobs}.",
            "logprobs",
        )
    logprobs = _n_probs(body) if logprobs is None else logprobs
    optional(body, "user", "string")
    params = _sampling(
        body,
        max_tokens=16 if max_tokens is None else max_tokens,  # OpenAI's default here
        logprobs=logprobs is not None,
        top_logprobs=logprobs or 0,
    )
    return CompletionRequest(
        model=model,
        prompts=prompts,
        params=params,
        n=n,
        stream=stream,
        include_usage=include_usage,
        echo=optional(body, "echo", "boolean", False),
        logprobs=logprobs,
        suffix=optional(body, "suffix", "string"),
        max_tokens_param=max_param,
        output=parse_openai_response_format(body),
        ignored=extras.paths,
    )


__all__ = [
    "APIError",
    "ChatRequest",
    "CompletionRequest",
    "parse_chat",
    "parse_completion",
    "parse_json",
]
