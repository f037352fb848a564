"""A llguidance Lark grammar that forces a valid tool call: the call syntax of a ToolFormat around
%json rules for each tool's parameters schema, optionally after a reasoning block."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from llguidance import LLMatcher

from ..errors import InvalidRequestError
from .reasoning import ReasoningFormat, think_rules
from .tool_grammar_kv import calls_rule, key_value_rules, named_call_rule

if TYPE_CHECKING:  # tools.py re-exports tool_call_grammar, so no import of it at run time
    from .tools import ToolFormat

__all__ = ["tool_call_grammar", "tool_schemas"]

# How the chat templates write arguments (tojson): one space after ":" and ",", no other whitespace.
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _functions(tools: Sequence[Mapping]) -> list[tuple[str, dict]]:
    """(name, arguments schema) of OpenAI tool objects (or bare function objects)."""
    out = []
    for k, tool in enumerate(tools):
        fn = tool.get("function", tool) if isinstance(tool, Mapping) else None
        name = fn.get("name") if isinstance(fn, Mapping) else None
        if not isinstance(name, str) or not name:
            raise InvalidRequestError(f"tools[{k}] has no function name", param="tools")
        params = fn.get("parameters")  # type: ignore[union-attr]
        if params is None:
            params = {"type": "object", "properties": {}, "additionalProperties": False}
        if not isinstance(params, Mapping) or params.get("type", "object") != "object":
            raise InvalidRequestError(
                f"the parameters of tool {name!r} must be a JSON schema of type object",
                param="tools",
            )
        extra = params.get("x-guidance")
        style = {**_JSON_STYLE, **extra} if isinstance(extra, Mapping) else _JSON_STYLE
        out.append((name, {**params, "type": "object", "x-guidance": style}))
    return out


def tool_schemas(tools: Sequence[Mapping] | None) -> dict[str, dict]:
    """Each tool's name -> its parameters schema (what ToolParser reads key/value calls by)."""
    return dict(_functions(tools or []))


def _check(grammar: str, what: str) -> None:
    failed, messages = LLMatcher.validate_grammar_with_warnings(
        LLMatcher.grammar_from_lark(grammar)
    )
    if failed:
        text = re.split(r"\n\s*\d+ \| ", messages[0] if messages else "")[0]  # drop the excerpt
        text = re.sub(r"^at \d+\(\d+\): (failed to compile JSON schema: )?", "", text.strip())
        detail = " ".join(text.split())
        raise InvalidRequestError(
            f"{what} cannot be enforced: {detail}",
            param="tools",
            hint="Simplify the schema (unsupported keywords are named above) or use "
            'tool_choice "auto".',
        )


def _lit(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def tool_call_grammar(
    fmt: ToolFormat,
    tools: Sequence[Mapping],
    choice: str | None = None,
    parallel: bool = True,
    reasoning: ReasoningFormat | None = None,
) -> str:
    """A llguidance Lark grammar whose complete strings are one call (several if `parallel`) in
    `fmt`'s syntax to `choice` (None: any of `tools`), with arguments valid against the tool's
    parameters schema; after a reasoning block in `reasoning`'s markers, when given (required
    if the prompt opened it). Raises InvalidRequestError(param="tools" or "tool_choice")."""
    funcs = _functions(tools)
    if choice is not None:
        funcs = [f for f in funcs if f[0] == choice]
        if not funcs:
            raise InvalidRequestError(
                f"tool_choice names function {choice!r}, which is not in tools",
                param="tool_choice",
            )
    if not funcs:
        raise InvalidRequestError("tool calls were required but tools is empty", param="tools")
    ids = dict(fmt.token_ids)

    def mark(m: str | None) -> str:  # a marker that is an added token must be matched as one
        return f"<[{ids[m]}]>" if m in ids else _lit(m or "")

    schemas = [json.dumps(schema, ensure_ascii=False) for _, schema in funcs]
    lines = [
        "start: think calls" if reasoning else "start: calls",
        f"calls: {_start_rule(fmt, parallel, mark)}",
    ]
    if fmt.syntax in ("xml", "glm"):  # one rule per parameter, values written raw or as JSON
        lines += key_value_rules(fmt, funcs, mark)
    else:
        calls = (_call_rule(fmt, name, k, mark) for k, (name, _) in enumerate(funcs))
        lines.append("call: " + " | ".join(calls))
        lines += (f"args{k}: %json {schema}" for k, schema in enumerate(schemas))
    if fmt.args_marker and fmt.call_id_marker:
        lines.append("CALL_ID: /[A-Za-z0-9]{9}/")  # Mistral's call ids: 9 letters or digits
    grammar = "\n".join(lines) + "\n" + (think_rules(reasoning) if reasoning else "")
    try:
        _check(grammar, "the tool-call grammar")
    except InvalidRequestError:  # name the tool whose schema is at fault
        for (name, _), schema in zip(funcs, schemas, strict=True):
            _check(f"start: %json {schema}", f"the parameters schema of tool {name!r}")
        raise
    return grammar


def _call_rule(fmt: ToolFormat, name: str, k: int, mark: Callable[[str | None], str]) -> str:
    if fmt.syntax in ("deepseek", "harmony"):
        return named_call_rule(fmt, name, f"args{k}", mark)
    head = '{"name": ' + _lit(name) + ', "' + fmt.args_key + '": '
    if fmt.call_end:
        parts = (
            mark(fmt.call_start),
            _lit("\n" + head),
            f"args{k}",
            _lit("}\n"),
            mark(fmt.call_end),
        )
        return " ".join(parts)
    if fmt.args_marker:
        call_id = f"({mark(fmt.call_id_marker)} CALL_ID)? " if fmt.call_id_marker else ""
        return f"{mark(fmt.call_start)} {_lit(name)} {call_id}{mark(fmt.args_marker)} args{k}"
    return f'{_lit(head)} args{k} "}}"'


def _start_rule(fmt: ToolFormat, parallel: bool, mark: Callable[[str | None], str]) -> str:
    """Calls as the format joins them (the chat templates' way)."""
    if fmt.syntax not in ("json", "python_tag"):
        return calls_rule(fmt, parallel, mark)
    if fmt.args_marker:
        return "call+" if parallel else "call"
    if fmt.call_end:
        return 'call ("\\n" call)*' if parallel else "call"
    if fmt.name in ("mistral", "granite"):
        calls = 'call (", " call)*' if parallel else "call"
        return f'{mark(fmt.call_start)} " "? "[" {calls} "]"'
    return 'call ("; " call)*' if parallel else "call"
