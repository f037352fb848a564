"""OpenAI Responses request bodies (POST /v1/responses) -> ResponsesRequest in the chat pipeline's
terms (server/dialogue.py), and input items -> neutral messages.

Input items are normalized as they are stored and listed (GET .../input_items): each gets an id,
message content becomes a list of parts. The conversion to messages follows the chat dialect:
function_call items become an assistant message's tool calls, function_call_output items "tool"
messages, reasoning items the next assistant message's reasoning_content. Only function tools are
supported; built-in tools (web_search, file_search…) and images are refused by name.

Unknown top-level fields are accepted and reported (the route lists them in a response header)
unless the server is strict, as OpenAI is.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mlxrun.errors import InvalidRequestError
from mlxrun.sampling import SamplingParams

from .errors import from_mlxrun, invalid
from .extras import Extras
from .protocol import MAX_TEMPERATURE, check_kind, optional, required, unrecognized
from .protocol_tools import (
    OutputFormat,
    ToolChoice,
    assistant_call,
    check_choice,
    check_unique,
    function_tool,
)

_HONOURED = {"model", "input", "instructions", "tools", "tool_choice", "parallel_tool_calls",
             "text", "reasoning", "max_output_tokens", "temperature", "top_p", "stop",
             "metadata", "store", "stream", "previous_response_id", "background",
             "seed", "top_k", "min_p"}  # fmt: skip
# Accepted and left alone: hints and bookkeeping that change nothing in what is generated here.
_NOOP = {"include", "truncation", "user", "safety_identifier", "service_tier", "prompt_cache_key",
         "prompt_cache_retention", "stream_options", "top_logprobs", "max_tool_calls",
         "client_metadata"}  # fmt: skip
_UNSUPPORTED = ("conversation", "prompt")  # server-side state we do not keep
_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")
_TEXT_PARTS = ("input_text", "output_text", "text", "refusal")
_ITEM_PREFIX = {"message": "msg", "function_call": "fc", "function_call_output": "fco",
                "reasoning": "rs"}  # fmt: skip


@dataclass(frozen=True)
class ResponsesRequest:
    model: str
    items: list[dict[str, Any]]  # this request's input items, normalized (ids given)
    params: SamplingParams  # max_tokens None: what the context leaves
    instructions: str | None = None
    tools: list[dict] | None = None  # neutral tools
    choice: ToolChoice = ToolChoice("none")
    output: OutputFormat | None = None
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    stream: bool = False
    store: bool = True
    background: bool = False
    previous_response_id: str | None = None
    namespaces: dict[str, str] = field(default_factory=dict)  # tool name -> its namespace
    echo: dict[str, Any] = field(default_factory=dict)  # request fields the response repeats
    ignored: tuple[str, ...] = ()  # unknown top-level fields, accepted and not used


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# ---------------------------------------------------------------- input items


def _text_part(part: Any, at: str, role: str) -> dict[str, Any]:
    kind = check_kind(part, "object", at).get("type")
    if kind in ("input_image", "input_file", "input_audio"):
        raise invalid(
            f"'{at}.type' is '{kind}': this model reads text only (send input_text parts).",
            f"{at}.type",
            code="unsupported_content_type",
        )
    if kind not in _TEXT_PARTS:
        raise invalid(f"Invalid value for '{at}.type': {kind!r}. Supported values are: "
                      "'input_text', 'output_text' and 'refusal'.", f"{at}.type",
                      code="invalid_value")  # fmt: skip
    key = "refusal" if kind == "refusal" else "text"
    text = check_kind(part.get(key), "string", f"{at}.{key}")
    if role == "assistant":
        return {"type": "output_text", "text": text, "annotations": []}
    return {"type": "input_text", "text": text}


def _message_item(item: Mapping[str, Any], at: str) -> dict[str, Any]:
    role = item.get("role")
    if role not in ("user", "system", "developer", "assistant"):
        raise invalid(f"Invalid value for '{at}.role': {role!r}. Supported values are: 'user', "
                      "'system', 'developer' and 'assistant'.", f"{at}.role",
                      code="invalid_value")  # fmt: skip
    content = item.get("content")
    if isinstance(content, str):
        content = [{"type": "output_text" if role == "assistant" else "input_text",
                    "text": content}]  # fmt: skip
    content = [
        _text_part(p, f"{at}.content[{j}]", role)
        for j, p in enumerate(check_kind(content, "array", f"{at}.content"))
    ]
    return {"type": "message", "role": role, "content": content, "status": "completed"}


def _output_text(output: Any, at: str) -> str:
    if isinstance(output, str):
        return output
    parts = check_kind(output, "array", at)
    return "".join(_text_part(p, f"{at}[{j}]", "user")["text"] for j, p in enumerate(parts))


def _item(raw: Any, at: str) -> dict[str, Any]:
    item = check_kind(raw, "object", at)
    kind = item.get("type", "message" if "role" in item else None)
    if kind == "message":
        out = _message_item(item, at)
    elif kind == "function_call":
        out = {"type": "function_call",
               "call_id": check_kind(item.get("call_id"), "string", f"{at}.call_id"),
               "name": check_kind(item.get("name"), "string", f"{at}.name"),
               "arguments": check_kind(item.get("arguments"), "string", f"{at}.arguments"),
               "status": item.get("status") or "completed"}  # fmt: skip
        if isinstance(item.get("namespace"), str):
            out["namespace"] = item["namespace"]
    elif kind == "function_call_output":
        out = {"type": "function_call_output",
               "call_id": check_kind(item.get("call_id"), "string", f"{at}.call_id"),
               "output": _output_text(item.get("output"), f"{at}.output"),
               "status": "completed"}  # fmt: skip
    elif kind == "reasoning":
        out = {"type": "reasoning",
               "summary": check_kind(item.get("summary") or [], "array", f"{at}.summary"),
               "content": check_kind(item.get("content") or [], "array", f"{at}.content")}  # fmt: skip
    else:
        raise invalid(
            f"Invalid input item '{at}': type {kind!r} is not supported by this server (use "
            "'message', 'function_call', 'function_call_output' or 'reasoning').",
            f"{at}.type",
            code="invalid_value",
        )
    given = item.get("id")
    out["id"] = given if isinstance(given, str) and given else new_id(_ITEM_PREFIX[kind])
    return out


def parse_input(raw: Any) -> list[dict[str, Any]]:
    """`input` (a string or a list of items) as normalized items."""
    if isinstance(raw, str):
        raw = [{"type": "message", "role": "user", "content": raw}]
    items = check_kind(raw, "array", "input")
    return [_item(item, f"input[{i}]") for i, item in enumerate(items)]


def _texts(parts: list[Any], key: str = "text") -> str:
    return "".join(p.get(key, "") for p in parts if isinstance(p, dict))


def to_messages(instructions: str | None, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Normalized items (earlier turns' output included) as the chat pipeline's messages."""
    out: list[dict[str, Any]] = (
        [{"role": "system", "content": instructions}] if instructions else []
    )
    names: dict[str, str] = {}  # call_id -> function name, for the outputs
    reasoning = ""

    def assistant() -> dict[str, Any]:
        nonlocal reasoning
        last = out[-1] if out else None
        if last is None or last["role"] != "assistant":
            last = {"role": "assistant", "content": ""}
            out.append(last)
        if reasoning:
            last["reasoning_content"] = reasoning
            reasoning = ""
        return last

    for i, item in enumerate(items):
        kind = item["type"]
        if kind == "reasoning":
            reasoning += _texts(item["content"]) or _texts(item["summary"])
        elif kind == "message" and item["role"] == "assistant":
            message = assistant()
            message["content"] += _texts(item["content"])
        elif kind == "message":
            role = "system" if item["role"] == "developer" else item["role"]
            text = _texts(item["content"])
            if role == "system" and out and out[-1]["role"] == "system":
                # One system turn: Codex sends several, and many templates take one at the start.
                out[-1]["content"] += "\n\n" + text
            else:
                out.append({"role": role, "content": text})
        elif kind == "function_call" and item.get("status") != "incomplete":  # cut off: unusable
            names[item["call_id"]] = item["name"]
            call = assistant_call(item["call_id"], item["name"], item["arguments"],
                                  f"input[{i}].arguments")  # fmt: skip
            message = assistant()
            message.setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            message = {"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]}
            if item["call_id"] in names:
                message["name"] = names[item["call_id"]]
            out.append(message)
    return out


# ---------------------------------------------------------------- tools, format, reasoning


def _function(tool: dict, at: str, unsupported: list[str]) -> dict | None:
    kind = tool.get("type")
    if kind != "function":
        unsupported.append(str(kind))
        return None
    return function_tool(tool.get("name"), tool.get("description"), tool.get("parameters"), at)


def _tools(body: Mapping[str, Any]) -> tuple[list[dict] | None, dict[str, str]]:
    """Function tools, and the namespace of each one that came in a `namespace` group (a named
    set of function tools; Codex sends its sub-agent tools so): its calls name it."""
    raw = optional(body, "tools", "array")
    tools: list[dict] = []
    unsupported: list[str] = []
    namespaces: dict[str, str] = {}
    for i, tool in enumerate(raw or ()):
        at = f"tools[{i}]"
        if check_kind(tool, "object", at).get("type") == "namespace":
            group = check_kind(tool.get("name"), "string", f"{at}.name")
            for j, inner in enumerate(check_kind(tool.get("tools"), "array", f"{at}.tools")):
                where = f"{at}.tools[{j}]"
                found = _function(check_kind(inner, "object", where), where, unsupported)
                if found is not None:
                    tools.append(found)
                    namespaces[found["function"]["name"]] = group
        elif (found := _function(tool, at, unsupported)) is not None:
            tools.append(found)
    if unsupported:
        raise invalid(
            f"Tool types not supported by this server: {', '.join(sorted(set(unsupported)))}. "
            "Only function tools ({'type': 'function', 'name', 'parameters'}) are.",
            "tools",
            code="unsupported_tool_type",
        )
    check_unique(tools, "tools")
    return tools or None, namespaces


def _tool_choice(body: Mapping[str, Any], tools: list[dict] | None) -> ToolChoice:
    raw = body.get("tool_choice")
    parallel = optional(body, "parallel_tool_calls", "boolean", True)
    if raw is None:
        return ToolChoice("auto" if tools else "none", parallel=parallel)
    if isinstance(raw, str):
        if raw not in ("auto", "none", "required"):
            raise invalid(f"Invalid value for 'tool_choice': {raw!r}. Supported values are: "
                          "'none', 'auto', 'required' or a function.", "tool_choice",
                          code="invalid_value")  # fmt: skip
        return check_choice(ToolChoice(raw, parallel=parallel), tools, "tool_choice")
    raw = check_kind(raw, "object", "tool_choice")
    if raw.get("type") != "function" or not isinstance(raw.get("name"), str):
        raise invalid("'tool_choice' must be 'auto', 'none', 'required' or "
                      "{'type': 'function', 'name': ...}; other kinds are not supported.",
                      "tool_choice")  # fmt: skip
    return check_choice(ToolChoice("named", raw["name"], parallel=False), tools, "tool_choice")


def _text_format(body: Mapping[str, Any]) -> OutputFormat | None:
    text = optional(body, "text", "object", {})
    fmt = text.get("format")
    kind = None if fmt is None else check_kind(fmt, "object", "text.format").get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return OutputFormat("json_object", param="text.format")
    if kind == "json_schema":
        schema = fmt.get("schema")
        if not isinstance(schema, (dict, bool)):
            raise invalid("'text.format.schema' must be a JSON schema object.",
                          "text.format.schema")  # fmt: skip
        return OutputFormat("json_schema", schema=schema, param="text.format")
    raise invalid(f"Invalid value for 'text.format.type': {kind!r}. Supported values are: "
                  "'text', 'json_object' and 'json_schema'.", "text.format.type",
                  code="invalid_value")  # fmt: skip


def _reasoning(body: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(template kwargs, the reasoning object the response repeats)."""
    raw = optional(body, "reasoning", "object")
    if raw is None:
        return {}, None
    effort = optional(raw, "effort", "string")
    if effort is not None and effort not in _EFFORTS:
        raise invalid(f"Invalid value for 'reasoning.effort': {effort!r}. Supported values are: "
                      + ", ".join(f"'{e}'" for e in _EFFORTS) + ".", "reasoning.effort",
                      code="invalid_value")  # fmt: skip
    kwargs: dict[str, Any] = {}
    if effort is not None:
        # gpt-oss templates read reasoning_effort, Qwen3-style ones enable_thinking.
        kwargs = {"reasoning_effort": effort, "enable_thinking": effort != "none"}
    return kwargs, {"effort": effort, "summary": raw.get("summary")}


# ---------------------------------------------------------------- the request


def _sampling(body: Mapping[str, Any]) -> SamplingParams:
    given = {k: body[k] for k in ("temperature", "top_p", "seed", "top_k", "min_p")
             if body.get(k) is not None}  # fmt: skip
    temperature = given.get("temperature")
    if isinstance(temperature, (int, float)) and temperature > MAX_TEMPERATURE:
        raise invalid(f"'temperature' must be between 0 and {MAX_TEMPERATURE}.", "temperature")
    stop = body.get("stop")
    stops = (stop,) if isinstance(stop, str) else tuple(optional(body, "stop", "array", []))
    for s in stops:
        check_kind(s, "string", "stop")
    max_tokens = optional(body, "max_output_tokens", "integer")
    if max_tokens is not None and max_tokens < 1:
        raise invalid(f"'max_output_tokens' must be at least 1, got {max_tokens}.",
                      "max_output_tokens")  # fmt: skip
    try:
        return SamplingParams(**given, stop=stops, max_tokens=max_tokens)
    except InvalidRequestError as e:
        raise from_mlxrun(e) from None
    except (TypeError, OverflowError) as e:
        raise invalid(f"Invalid sampling parameters: {e}") from None


def _unknown(body: Mapping[str, Any], strict: bool) -> tuple[str, ...]:
    for name in _UNSUPPORTED:
        if body.get(name) is not None:
            raise invalid(f"'{name}' is not supported by this server; send the conversation "
                          "as input, or continue with previous_response_id.", name,
                          code="unsupported_parameter")  # fmt: skip
    extras = Extras(strict)
    extras.check(body, _HONOURED | _NOOP, unrecognized)
    return tuple(extras.paths)


def parse_responses(body: Mapping[str, Any], *, strict: bool = False) -> ResponsesRequest:
    """A POST /v1/responses body, validated, in the pipeline's terms."""
    ignored = _unknown(body, strict)
    model = required(body, "model", "string")
    if body.get("input") is None:
        raise invalid("Missing required parameter: 'input'.", "input",
                      code="missing_required_parameter")  # fmt: skip
    items = parse_input(body["input"])
    tools, namespaces = _tools(body)
    choice = _tool_choice(body, tools)
    template_kwargs, reasoning = _reasoning(body)
    store = optional(body, "store", "boolean", True)
    background = optional(body, "background", "boolean", False)
    stream = optional(body, "stream", "boolean", False)
    if background and not store:
        raise invalid("A background response must be stored: send store true.", "background")
    if background and stream:
        raise invalid("Streaming a background response is not supported by this server.",
                      "background", code="unsupported_parameter")  # fmt: skip
    metadata = optional(body, "metadata", "object", {})
    for key, value in metadata.items():
        check_kind(value, "string", f"metadata.{key}")
    params = _sampling(body)
    fmt = optional(body, "text", "object", {}).get("format") or {"type": "text"}
    echo = {
        "instructions": optional(body, "instructions", "string"),
        "max_output_tokens": params.max_tokens,
        "metadata": metadata,
        "parallel_tool_calls": choice.parallel,
        "reasoning": reasoning,
        "store": store,
        "temperature": body.get("temperature", 1.0),
        "top_p": body.get("top_p", 1.0),
        "text": {"format": fmt},
        "tool_choice": body.get("tool_choice") or ("auto" if tools else "none"),
        "tools": list(body.get("tools") or []),
        "truncation": "disabled",
        "user": body.get("user") if isinstance(body.get("user"), str) else None,
        "background": background,
    }
    return ResponsesRequest(
        model=model,
        items=items,
        params=params,
        instructions=echo["instructions"],
        tools=tools,
        choice=choice,
        output=_text_format(body),
        namespaces=namespaces,
        template_kwargs=template_kwargs,
        stream=stream,
        store=store,
        background=background,
        previous_response_id=optional(body, "previous_response_id", "string"),
        echo=echo,
        ignored=ignored,
    )
