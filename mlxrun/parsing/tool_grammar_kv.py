"""Grammar pieces (llguidance Lark) for the call syntaxes that are not a JSON call object: the
key/value ones (Qwen3-Coder XML parameters, GLM-4.5 arg_key/arg_value), where each parameter gets
a rule and a string is written raw, and the named ones (DeepSeek, harmony), where the name sits in
markers and the arguments are one JSON object. tool_grammar puts them together."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from .tool_formats import DS_CALL_BEGIN, DS_CALL_END, DS_SEP
from .tool_readers import is_string

if TYPE_CHECKING:
    from .tool_formats import ToolFormat

__all__ = ["calls_rule", "key_value_rules", "named_call_rule"]

Mark = Callable[[str | None], str]


def _lit(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _re(text: str) -> str:
    """`text` as a literal inside a Lark /regex/ (re.escape leaves line breaks raw)."""
    escaped = re.escape(text).replace("/", "\\/")
    return escaped.replace("\n", "n").replace("\r", "r").replace("\t", "t")


def calls_rule(fmt: ToolFormat, parallel: bool, mark: Mark) -> str:
    """The `calls` rule: calls as the format's chat template joins them."""
    if fmt.syntax == "deepseek":
        sep = '"\\n" ' if fmt.variant == "v3" else ""
        calls = f"call ({sep}call)*" if parallel else "call"
        return f"{mark(fmt.call_start)} {calls} {mark(fmt.call_end)}"
    if fmt.syntax == "harmony":
        return "call"  # a harmony turn ends at its call (<|call|> is an end-of-turn token)
    return 'call ("\\n" call)*' if parallel else "call"


def named_call_rule(fmt: ToolFormat, name: str, args: str, mark: Mark) -> str:
    """One call to `name` whose arguments object is the rule `args` (DeepSeek, harmony)."""
    if fmt.syntax == "harmony":
        head = f"{mark('<|channel|>')} {_lit('commentary to=functions.' + name + ' ')}"
        return f'{head} {mark("<|constrain|>")} "json" {mark("<|message|>")} {args}'
    if fmt.variant == "v3":
        body = f'"function" {mark(DS_SEP)} {_lit(name + chr(10) + "```json" + chr(10))} {args}'
        return f'{mark(DS_CALL_BEGIN)} {body} "\\n```" {mark(DS_CALL_END)}'
    return f"{mark(DS_CALL_BEGIN)} {_lit(name)} {mark(DS_SEP)} {args} {mark(DS_CALL_END)}"


def key_value_rules(fmt: ToolFormat, funcs: list[tuple[str, dict]], mark: Mark) -> list[str]:
    """`call` and the rules under it for Qwen3-Coder or GLM-4.5: the schema's properties in its
    order, the required ones always, the others optionally; no properties it does not declare."""
    glm = fmt.syntax == "glm"
    close = "</arg_value>" if glm else "\n</parameter>\n"
    calls, lines = [], []
    for k, (name, schema) in enumerate(funcs):
        props = schema.get("properties") or {}
        required = set(schema.get("required") or ())
        params = []
        for j, (key, prop) in enumerate(props.items()):
            value = f"v{k}_{j}"
            if glm:
                head = f'{mark("<arg_key>")} {_lit(key)} {mark("</arg_key>")} "\\n" '
                param = f'{head}{mark("<arg_value>")} {value} "\\n"'
            else:
                param = f"{_lit('<parameter=' + key + '>' + chr(10))} {value}"
            params.append(f"({param})" + ("" if key in required else "?"))
            lines.append(_value_rule(value, prop, close, mark))
        if glm:
            parts = [mark(fmt.call_start), _lit(name + "\n"), *params, mark(fmt.call_end)]
        else:
            head = _lit(f"\n<function={name}>\n")
            tail = [_lit("</function>\n"), mark(fmt.call_end)]
            parts = [mark(fmt.call_start), head, *params, *tail]
        calls.append(" ".join(parts))
    return ["call: " + " | ".join(calls), *lines]


def _value_rule(rule: str, prop: Mapping[str, Any], close: str, mark: Mark) -> str:
    """`rule`: one parameter's value and the marker that closes it. A string is raw text: each of
    its constraints (enum/const, pattern, length) is a regex the text must match."""
    if not is_string(prop):
        schema = json.dumps({**prop, "x-guidance": _JSON_STYLE}, ensure_ascii=False)
        return f"{rule}: %json {schema} {mark(close)}"
    enum = prop.get("enum") if "const" not in prop else [prop["const"]]
    bodies = [f"(?s:.){{{prop.get('minLength', 0)},{prop.get('maxLength', '')}}}"]
    if isinstance(enum, list):
        bodies.append("(?:" + "|".join(_re(e) for e in enum if isinstance(e, str)) + ")")
    if isinstance(prop.get("pattern"), str):  # JSON Schema patterns search: unanchored
        pattern = prop["pattern"].replace("/", "\\/")
        head = "" if pattern.startswith("^") else "(?s:.)*"
        tail = "" if pattern.endswith("$") and not pattern.endswith("\\$") else "(?s:.)*"
        bodies.append(f"{head}(?:{pattern.removeprefix('^').removesuffix('$')}){tail}")
    if mark(close).startswith("<["):  # an added token ends it (text cannot spell it)
        texts = [f"/(?s:{b})/" for b in bodies]
        texts.append(f"~/(?s:.*){_re(close)}(?s:.*)/")
        return (
            f"{rule}: {rule.upper()}_TEXT {mark(close)}\n{rule.upper()}_TEXT: {' & '.join(texts)}"
        )
    # The value may not hold its closing marker: the parser stops at the first one.
    end = _re(close.strip())
    texts = [f"/(?s:{b}){_re(close)}/" for b in bodies]
    texts.append(f"~/(?s:.*){end}(?s:.*){end}(?s:.*)/")
    return f"{rule}[lazy]: {' & '.join(texts)}"


# How chat templates write JSON values (tojson): one space after ":" and ",", nothing else.
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
