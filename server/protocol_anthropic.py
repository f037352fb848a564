"""Anthropic Messages request bodies (/v1/messages and count_tokens) -> MessagesRequest in the
chat pipeline's terms, validated with Anthropic's error wording.

Content blocks become neutral messages: tool_use blocks -> assistant tool calls, tool_result
blocks -> "tool" messages, thinking -> reasoning_content. Consecutive turns of one role merge as
Anthropic merges them. A system message inside `messages` (Claude Code sends one after the user
turn) stays a system message; the tokenizer places or folds it (mlxrun/chat_turns.py). The
conversation up to the last cache_control mark is kept apart, so the route can measure (and pin)
that prefix.

Unknown fields are noted and reported (server/extras.py), or refused with Anthropic's "Extra inputs
are not permitted" under --strict. Known fields with no effect here (context_management, speed...)
are reported too; output_config.effort reaches the template as reasoning_effort.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mlxrun.errors import InvalidRequestError
from mlxrun.sampling import SamplingParams

from .errors import APIError, from_mlxrun, invalid
from .extras import Extras
from .protocol import check_kind, optional, required
from .protocol_tools import (
    OutputFormat,
    ToolChoice,
    assistant_call,
    check_choice,
    check_unique,
    function_tool,
)

_COMMON = {"model", "messages", "system", "tools", "tool_choice", "thinking", "cache_control",
           "output_config", "speed", "context_management", "mcp_servers", "container",
           "diagnostics", "user_profile_id", "workspace_id", "inference_geo"}  # fmt: skip
_CREATE = frozenset(_COMMON | {"max_tokens", "stop_sequences", "stream", "temperature", "top_p",
                               "top_k", "metadata", "service_tier"})  # fmt: skip
_COUNT = frozenset(_COMMON)
_UNSUPPORTED = ("mcp_servers", "container")  # asks for server-side machinery we do not have
_NO_EFFECT = ("context_management", "speed", "diagnostics", "inference_geo", "service_tier")
_TOOL_KEYS = frozenset({"name", "description", "input_schema", "cache_control", "type", "strict",
                        "input_examples", "defer_loading", "allowed_callers",
                        "eager_input_streaming"})  # fmt: skip


@dataclass(frozen=True)
class MessagesRequest:
    model: str
    messages: list[dict[str, Any]]  # neutral messages (system first)
    params: SamplingParams  # max_tokens None: plan_chat leaves what the context allows
    max_tokens: int = 0
    stream: bool = False
    tools: list[dict] | None = None
    choice: ToolChoice = ToolChoice("none")
    output: OutputFormat | None = None
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    show_thinking: bool = True
    marked: list[dict[str, Any]] | None = None  # the conversation up to the last cache mark
    ignored: list[str] = field(default_factory=list)  # fields accepted but not acted on

    @property
    def render_tools(self) -> list[dict] | None:
        """Tools as plan_chat puts them in the prompt (left out with tool_choice none)."""
        return self.tools if self.tools and self.choice.mode != "none" else None


def _obj(value: Any, where: str) -> dict:
    return check_kind(value, "object", where)


def _field(obj: Mapping[str, Any], key: str, kind: str, where: str) -> Any:
    """A required member of a nested object, named by its path in errors."""
    if obj.get(key) is None:
        raise invalid(f"{where}.{key}: Field required", f"{where}.{key}")
    return check_kind(obj[key], kind, f"{where}.{key}")


def _text_blocks(content: Any, where: str) -> str:
    """A string, or text blocks (the only kind supported here), as one string."""
    if isinstance(content, str):
        return content
    texts = []
    for j, block in enumerate(check_kind(content, "array", where)):
        at = f"{where}.{j}"
        kind = _obj(block, at).get("type")
        if kind != "text":
            raise _unsupported_block(kind, at)
        texts.append(_field(block, "text", "string", at))
    return "\n\n".join(texts)


def _unsupported_block(kind: Any, at: str) -> APIError:
    return invalid(
        f"{at}: content blocks of type {kind!r} are not supported by this server"
        + (" (this model reads text only)." if kind in ("image", "document") else "."),
        f"{at}.type",
    )


def _user(content: Any, at: str, names: dict[str, str]) -> list[dict[str, Any]]:
    """One user turn: tool_result blocks become "tool" messages, text blocks user messages."""
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    out: list[dict[str, Any]] = []
    for j, block in enumerate(check_kind(content, "array", f"{at}.content")):
        where = f"{at}.content.{j}"
        kind = _obj(block, where).get("type")
        if kind == "text":
            out.append({"role": "user", "content": _field(block, "text", "string", where)})
        elif kind == "tool_result":
            call_id = _field(block, "tool_use_id", "string", where)
            text = _text_blocks(block.get("content", ""), f"{where}.content")
            if optional(block, "is_error", "boolean", False):
                text = f"Error: {text}"
            message = {"role": "tool", "tool_call_id": call_id, "content": text}
            if call_id in names:
                message["name"] = names[call_id]
            out.append(message)
        else:
            raise _unsupported_block(kind, where)
    return out


def _assistant(content: Any, at: str, names: dict[str, str]) -> dict[str, Any]:
    """One assistant turn: text, thinking (kept as reasoning_content) and tool_use blocks."""
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    texts, thoughts, calls = [], [], []
    for j, block in enumerate(check_kind(content, "array", f"{at}.content")):
        where = f"{at}.content.{j}"
        kind = _obj(block, where).get("type")
        if kind == "text":
            texts.append(_field(block, "text", "string", where))
        elif kind == "thinking":
            thoughts.append(_field(block, "thinking", "string", where))
        elif kind == "tool_use":
            call_id, name = (
                _field(block, "id", "string", where),
                _field(block, "name", "string", where),
            )
            names[call_id] = name
            arguments = _field(block, "input", "object", where)
            calls.append(assistant_call(call_id, name, arguments, f"{where}.input"))
        elif kind != "redacted_thinking":  # encrypted thinking: nothing we can read
            raise _unsupported_block(kind, where)
    message: dict[str, Any] = {"role": "assistant", "content": "\n\n".join(texts)}
    if thoughts:
        message["reasoning_content"] = "\n\n".join(thoughts)
    if calls:
        message["tool_calls"] = calls
    return message


def _append(out: list[dict[str, Any]], message: dict[str, Any]) -> None:
    """Consecutive user (or assistant) turns are one turn, as Anthropic combines them."""
    last = out[-1] if out else None
    if last is None or last["role"] != message["role"] or message["role"] == "tool":
        out.append(message)
        return
    for key in ("content", "reasoning_content"):
        parts = [p for p in (last.get(key), message.get(key)) if p]
        if parts:
            last[key] = "\n\n".join(parts)
    if message.get("tool_calls"):
        last["tool_calls"] = [*last.get("tool_calls", ()), *message["tool_calls"]]


def _extra(path: str) -> APIError:
    return invalid(f"{path}: Extra inputs are not permitted", path)


def conversation(system: str, raw: list[Any], extras: Extras | None = None) -> list[dict[str, Any]]:
    """Anthropic's system + messages as neutral messages."""
    extras = extras or Extras()
    out: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    names: dict[str, str] = {}  # tool_use id -> tool name, for the results
    for i, message in enumerate(raw):
        at = f"messages.{i}"
        extras.check(_obj(message, at), ("role", "content"), _extra, at)
        role, content = _field(message, "role", "string", at), message.get("content")
        if content is None:
            raise invalid(f"{at}.content: Field required", f"{at}.content")
        if role == "user":
            parts = _user(content, at, names)
        elif role == "assistant":
            parts = [_assistant(content, at, names)]
        elif role == "system":  # not in Anthropic's API, but Claude Code sends it
            parts = [{"role": "system", "content": _text_blocks(content, f"{at}.content")}]
        else:
            raise invalid(f"{at}.role: Input should be 'user', 'assistant' or 'system'",
                          f"{at}.role")  # fmt: skip
        for part in parts:
            _append(out, part)
    return out


def _last_mark(body: Mapping[str, Any]) -> tuple[int, int] | None:
    """(message, block) of the last cache_control mark; (-1, 0) for system or tools."""
    raw = body["messages"]
    if body.get("cache_control") is not None and raw:  # automatic: the last block
        content = raw[-1].get("content")
        return len(raw) - 1, len(content) - 1 if isinstance(content, list) else 0
    for i in range(len(raw) - 1, -1, -1):
        content = raw[i].get("content")
        for j in range(len(content) - 1, -1, -1) if isinstance(content, list) else ():
            if isinstance(content[j], dict) and content[j].get("cache_control") is not None:
                return i, j
    for blocks in (body.get("system"), body.get("tools")):
        if isinstance(blocks, list) and any(
            isinstance(b, dict) and b.get("cache_control") is not None for b in blocks
        ):
            return -1, 0
    return None


def _marked(body: Mapping[str, Any], system: str) -> list[dict[str, Any]] | None:
    mark = _last_mark(body)
    if mark is None:
        return None
    i, j = mark
    raw = list(body["messages"][: max(i, 0)])
    if i >= 0:
        content = body["messages"][i]["content"]
        raw.append({**body["messages"][i], "content": content[: j + 1] if isinstance(
            content, list) else content})  # fmt: skip
    return conversation(system, raw)


def _tools(body: Mapping[str, Any], extras: Extras) -> list[dict] | None:
    raw = optional(body, "tools", "array")
    if not raw:
        return None
    tools = []
    for i, tool in enumerate(raw):
        at = f"tools.{i}"
        kind = _obj(tool, at).get("type")
        if kind not in (None, "custom"):
            raise invalid(
                f"{at}: the server tool {tool.get('name', kind)!r} (type {kind!r}) is not "
                "supported by this server; only client tools (name, description, input_schema).",
                f"{at}.type",
            )
        extras.check(tool, _TOOL_KEYS, _extra, at)
        schema = _field(tool, "input_schema", "object", at)
        tools.append(function_tool(tool.get("name"), tool.get("description"), schema, at))
    check_unique(tools, "tools")
    return tools


def _tool_choice(body: Mapping[str, Any], tools: list[dict] | None) -> ToolChoice:
    raw = optional(body, "tool_choice", "object")
    if raw is None:
        return ToolChoice("auto" if tools else "none")
    kind = raw.get("type")
    parallel = not optional(raw, "disable_parallel_tool_use", "boolean", False)
    modes = {"auto": "auto", "any": "required", "tool": "named", "none": "none"}
    if kind not in modes:
        raise invalid("tool_choice.type: Input should be 'auto', 'any', 'tool' or 'none'",
                      "tool_choice.type")  # fmt: skip
    name = _field(raw, "name", "string", "tool_choice") if kind == "tool" else None
    choice = ToolChoice(modes[kind], name, parallel and kind != "tool")  # one call of that tool
    return check_choice(choice, tools, "tool_choice")


def _thinking(body: Mapping[str, Any], choice: ToolChoice) -> tuple[dict[str, Any], bool]:
    """(template kwargs, whether thinking is shown) for `thinking`; its budget is not enforced."""
    raw = optional(body, "thinking", "object")
    if raw is None:
        return {}, True
    kind = raw.get("type")
    if kind not in ("enabled", "disabled", "adaptive"):
        raise invalid("thinking.type: Input should be 'enabled', 'disabled' or 'adaptive'",
                      "thinking.type")  # fmt: skip
    if kind == "enabled" and _field(raw, "budget_tokens", "integer", "thinking") < 1024:
        raise invalid("thinking.budget_tokens: Input should be greater than or equal to 1024",
                      "thinking.budget_tokens")  # fmt: skip
    if kind != "disabled" and choice.mode in ("required", "named"):
        raise invalid("Thinking may not be enabled when tool_choice forces tool use.",
                      "tool_choice")  # fmt: skip
    # Templates of thinking models (Qwen3 and kin) read enable_thinking; others ignore it.
    return {"enable_thinking": kind != "disabled"}, raw.get("display") != "omitted"


def _output(body: Mapping[str, Any], extras: Extras, kwargs: dict[str, Any]) -> OutputFormat | None:
    """output_config: format constrains decoding; effort goes to the template (updating kwargs)."""
    config = optional(body, "output_config", "object", {})
    extras.check(config, ("format", "effort"), _extra, "output_config")
    effort = optional(config, "effort", "string")
    if effort is not None:  # templates that know it read it (gpt-oss); others ignore it
        kwargs.setdefault("reasoning_effort", effort)
    fmt = optional(config, "format", "object")
    if fmt is None:
        return None
    if fmt.get("type") != "json_schema":
        raise invalid("output_config.format.type: Input should be 'json_schema'",
                      "output_config.format.type")  # fmt: skip
    schema = _field(fmt, "schema", "object", "output_config.format")
    return OutputFormat("json_schema", schema=schema, param="output_config.format")


def _sampling(body: Mapping[str, Any]) -> SamplingParams:
    stops = optional(body, "stop_sequences", "array", [])
    for i, stop in enumerate(stops):
        check_kind(stop, "string", f"stop_sequences.{i}")
    temperature = optional(body, "temperature", "number", 1.0)
    if not 0 <= temperature <= 1:
        raise invalid("temperature: Input should be between 0 and 1", "temperature")
    given = {k: body[k] for k in ("top_p", "top_k") if body.get(k) is not None}
    try:
        return SamplingParams(temperature=temperature, stop=tuple(stops), **given)
    except InvalidRequestError as e:
        raise from_mlxrun(e) from None
    except (TypeError, OverflowError) as e:
        raise invalid(f"Invalid sampling parameters: {e}") from None


def _check_fields(body: Mapping[str, Any], counting: bool, extras: Extras) -> None:
    extras.check(body, _COUNT if counting else _CREATE, _extra)
    for name, value in body.items():
        if name in _UNSUPPORTED and value:
            raise invalid(f"{name}: not supported by this server.", name)
        if name in _NO_EFFECT and value is not None:
            extras.ignore(name)


def parse_messages(
    body: Mapping[str, Any], *, counting: bool = False, strict: bool = False
) -> MessagesRequest:
    """A /v1/messages (or count_tokens) body, validated, in the pipeline's terms."""
    extras = Extras(strict)
    _check_fields(body, counting, extras)
    model = required(body, "model", "string")
    raw = required(body, "messages", "array")
    if not raw:
        raise invalid("messages: at least one message is required", "messages")
    system = _text_blocks(body.get("system") or "", "system")
    messages = conversation(system, raw, extras)
    tools = _tools(body, extras)
    choice = _tool_choice(body, tools)
    template_kwargs, show_thinking = _thinking(body, choice)
    output = _output(body, extras, template_kwargs)
    last = messages[-1] if messages else None
    if last and last["role"] == "assistant" and last["content"] and not last.get("tool_calls"):
        template_kwargs["continue_final_message"] = True  # prefill: the reply continues it
    max_tokens = 0 if counting else required(body, "max_tokens", "integer")
    if max_tokens < 0:
        raise invalid("max_tokens: Input should be greater than or equal to 0", "max_tokens")
    optional(body, "metadata", "object")
    return MessagesRequest(
        model=model,
        messages=messages,
        params=_sampling(body),
        max_tokens=max_tokens,
        stream=optional(body, "stream", "boolean", False),
        tools=tools,
        choice=choice,
        output=output,
        template_kwargs=template_kwargs,
        show_thinking=show_thinking,
        marked=_marked(body, system),
        ignored=extras.paths,
    )
