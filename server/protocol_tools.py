"""Tools, tool choice, structured output and tool-call messages as every dialect hands them to the
chat pipeline (server/dialogue.py), plus their OpenAI parsers.

The neutral types are OpenAI-shaped because chat templates expect that shape: tools are
`{"type": "function", "function": {"name", "description", "parameters"}}` and an assistant's
calls are `{"id", "type": "function", "function": {"name", "arguments": <dict>}}`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import invalid

_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
MAX_TOOLS = 128  # OpenAI's limit


@dataclass(frozen=True)
class ToolChoice:
    mode: str = "auto"  # "auto" | "none" | "required" | "named"
    name: str | None = None  # the function, for "named"
    parallel: bool = True  # several calls in one turn


@dataclass(frozen=True)
class OutputFormat:
    """What decoding is constrained to: "json_object", "json_schema" (schema) or "grammar"
    (Lark or GBNF text). `param` names the request field, for errors."""

    kind: str
    schema: Any = None
    grammar: str | None = None
    param: str = "response_format"


def function_tool(name: Any, description: Any, parameters: Any, where: str) -> dict[str, Any]:
    """One tool in the neutral shape, validated (every dialect's tools end up here)."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise invalid(
            f"Invalid '{where}.name': function names are 1-64 letters, digits, '_', '.' or '-'.",
            f"{where}.name",
        )
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    if not isinstance(parameters, dict):
        raise invalid(f"'{where}.parameters' must be a JSON schema object.", f"{where}.parameters")
    function: dict[str, Any] = {"name": name, "parameters": parameters}
    if description is not None:
        if not isinstance(description, str):
            raise invalid(f"'{where}.description' must be a string.", f"{where}.description")
        function["description"] = description
    return {"type": "function", "function": function}


def check_unique(tools: list[dict], param: str) -> None:
    names = [t["function"]["name"] for t in tools]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise invalid(f"Tool names must be unique; '{dup}' appears twice.", param)
    if len(tools) > MAX_TOOLS:
        raise invalid(f"At most {MAX_TOOLS} tools are allowed, got {len(tools)}.", param)


def tool_names(tools: list[dict] | None) -> list[str]:
    return [t["function"]["name"] for t in tools or ()]


def arguments_object(arguments: Any, where: str) -> dict[str, Any]:
    """A call's arguments as a dict (templates render it with tojson); OpenAI sends JSON text."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            raise invalid(f"'{where}' must be a JSON object encoded as a string.", where) from None
    if not isinstance(arguments, dict):
        raise invalid(f"'{where}' must be a JSON object.", where)
    return arguments


def assistant_call(call_id: str, name: str, arguments: Any, where: str) -> dict[str, Any]:
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": arguments_object(arguments, where)},
    }


# ---------------------------------------------------------------- OpenAI


def _object(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise invalid(f"'{where}' must be an object.", where, code="invalid_type")
    return value


def _objects(raw: Any, where: str) -> list[tuple[str, dict]]:
    """An array of objects, each with its place for error messages."""
    if not isinstance(raw, list):
        raise invalid(f"'{where}' must be an array.", where, code="invalid_type")
    return [(f"{where}[{i}]", _object(item, f"{where}[{i}]")) for i, item in enumerate(raw)]


def parse_openai_tools(body: Mapping[str, Any]) -> list[dict] | None:
    """`tools` (or the legacy `functions`) as neutral tools; None when absent or empty."""
    raw, param, legacy = body.get("tools"), "tools", False
    if raw is None and body.get("functions") is not None:
        raw, param, legacy = body["functions"], "functions", True
    if raw is None:
        return None
    tools = []
    for where, item in _objects(raw, param):
        if not legacy:
            if item.get("type") != "function":
                raise invalid(
                    f"'{where}.type' must be 'function' (other tool types are not supported).",
                    f"{where}.type",
                )
            where = f"{where}.function"
            item = _object(item.get("function"), where)
        tools.append(
            function_tool(item.get("name"), item.get("description"), item.get("parameters"), where)
        )
    check_unique(tools, param)
    return tools or None


def parse_openai_tool_choice(body: Mapping[str, Any], tools: list[dict] | None) -> ToolChoice:
    raw, param = body.get("tool_choice"), "tool_choice"
    if raw is None and body.get("function_call") is not None:
        raw, param = body["function_call"], "function_call"
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise invalid("'parallel_tool_calls' must be a boolean.", "parallel_tool_calls")
    parallel = True if parallel is None else parallel
    if raw is None:
        return ToolChoice("auto" if tools else "none", parallel=parallel)
    if isinstance(raw, str):
        if raw not in ("auto", "none", "required"):
            raise invalid(
                f"Invalid value for '{param}': '{raw}'. Supported values are: 'none', 'auto', "
                "'required' or an object naming a function.",
                param,
                code="invalid_value",
            )
        choice = ToolChoice(raw, parallel=parallel)
    else:
        raw = _object(raw, param)
        function = raw.get("function") if param == "tool_choice" else raw
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str):
            raise invalid(f"'{param}' must name a function: {{'type': 'function', "
                          "'function': {'name': ...}}.", param)  # fmt: skip
        choice = ToolChoice("named", name, parallel=False)
    return check_choice(choice, tools, param)


def check_choice(choice: ToolChoice, tools: list[dict] | None, param: str) -> ToolChoice:
    if choice.mode in ("required", "named") and not tools:
        raise invalid(f"'{param}' asks for a tool call but no tools were given.", param)
    if choice.mode == "named" and choice.name not in tool_names(tools):
        raise invalid(
            f"'{param}' names the function '{choice.name}', which is not among the tools.", param
        )
    return choice


def parse_openai_response_format(body: Mapping[str, Any]) -> OutputFormat | None:
    """`response_format` (text / json_object / json_schema) or the llama.cpp `grammar` field."""
    grammar = body.get("grammar")
    fmt = body.get("response_format")
    if fmt is not None:
        fmt = _object(fmt, "response_format")  # before any use: a string here was once a 500
    if grammar is not None:
        if not isinstance(grammar, str) or not grammar.strip():
            raise invalid("'grammar' must be a non-empty Lark or GBNF grammar.", "grammar")
        if fmt is not None and fmt.get("type") != "text":
            raise invalid("Send either 'grammar' or 'response_format', not both.", "grammar")
        return OutputFormat("grammar", grammar=grammar, param="grammar")
    if fmt is None:
        return None
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return OutputFormat("json_object")
    if kind == "json_schema":
        spec = _object(fmt.get("json_schema"), "response_format.json_schema")
        name = spec.get("name")
        if name is not None and not (isinstance(name, str) and _NAME.match(name)):
            raise invalid(
                "'response_format.json_schema.name' must be 1-64 letters, digits, '_' or '-'.",
                "response_format.json_schema.name",
            )
        schema = spec.get("schema", {})
        if not isinstance(schema, (dict, bool)):
            raise invalid(
                "'response_format.json_schema.schema' must be a JSON schema object.",
                "response_format.json_schema.schema",
            )
        return OutputFormat("json_schema", schema=schema)
    raise invalid(
        f"Invalid value for 'response_format.type': {kind!r}. Supported values are: 'text', "
        "'json_object' and 'json_schema'.",
        "response_format.type",
        code="invalid_value",
    )


def parse_openai_calls(raw: Any, where: str) -> list[dict[str, Any]]:
    """An assistant message's `tool_calls` in the neutral shape."""
    calls = []
    for j, (at, call) in enumerate(_objects(raw, where)):
        function = _object(call.get("function"), f"{at}.function")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise invalid(f"Missing required parameter: '{at}.function.name'.", f"{at}.function")
        call_id = call["id"] if isinstance(call.get("id"), str) else f"call_{j}"
        calls.append(
            assistant_call(call_id, name, function.get("arguments"), f"{at}.function.arguments")
        )
    return calls
