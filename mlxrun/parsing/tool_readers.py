"""Block readers for the tool-call syntaxes that are not a JSON call object after a marker:
Qwen3-Coder's XML parameters, GLM-4.5's arg_key/arg_value pairs, DeepSeek's tool▁call blocks and
harmony's commentary messages (formats in tool_formats).

Each reader is a generator over a ToolParser's cursor, started just after the format's call marker;
it yields when it needs more text and returns whether the block was well formed (when not, the
parser gives the block's text back as content). Key/value syntaxes write string parameters raw and
the others as JSON, so a value is read back by its parameter's schema type (`parameter_value`).
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable, Generator, Mapping
from typing import TYPE_CHECKING, Any

from .reasoning import partial_marker_len
from .tool_formats import DS_CALL_BEGIN, DS_CALL_END, DS_CALLS_END, DS_SEP

if TYPE_CHECKING:
    from .tools import ToolParser

__all__ = ["READERS", "parameter_value"]

_Block = Generator[None, None, bool]
_NAME_LIMIT = 128  # a name or key longer than this is not one: stop holding the text back
_PYTHON_LITERALS = {"True": True, "False": False, "None": None}  # what jinja's `| string` writes


_NAME = re.compile(r"[\w.\-]+")  # a function name as these syntaxes spell it


def _named(p: ToolParser, name: str) -> bool:
    return bool(_NAME.fullmatch(name)) and p.allowed(name)


def _no_constant(text: str) -> Any:
    raise ValueError(text)  # NaN and Infinity are not JSON


def is_string(schema: Mapping[str, Any] | None) -> bool:
    """Whether a parameter's text is its value as it stands (the template wrote it raw)."""
    schema = schema if isinstance(schema, Mapping) else {}
    kind = schema.get("type")
    types = [kind] if isinstance(kind, str) else list(kind or [])
    enum = schema.get("enum")
    return "string" in types or (
        not types
        and isinstance(enum, list)
        and bool(enum)
        and all(isinstance(e, str) for e in enum)
    )


def parameter_value(text: str, schema: Mapping[str, Any] | None) -> Any:
    """A parameter's raw text as its value: verbatim for string parameters, else the JSON (or
    Python literal) it spells, else the text itself."""
    if is_string(schema):
        return text
    try:
        return json.loads(text, parse_constant=_no_constant)
    except ValueError:
        return _PYTHON_LITERALS.get(text.strip(), text)


def qwen3_coder(p: ToolParser) -> _Block:
    """<function=NAME>\\n<parameter=KEY>\\nVALUE\\n</parameter>\\n...</function>\\n</tool_call>;
    a hermes JSON object in the block is read too (the family's older syntax), and so is a bare
    <function=...></function> (the model dropped <tool_call>), with the orphan </tool_call>."""
    cur, bare = p.cur, p.opened_by == p.fmt.alt_start
    if not bare and not (yield from p.ws()):
        return False
    if not bare and cur.s[cur.i] == "{":
        return (yield from p.hermes())
    if not bare and (yield from p.literal(("<function=",))) is None:
        return False
    got = yield from p.until((">",), _NAME_LIMIT)
    if got is None or not _named(p, got[0].strip()):
        return False
    name = got[0].strip()
    call = p.open_call(name)
    while True:
        if not (yield from p.ws()):
            return False
        tag = yield from p.literal(("<parameter=", "</function>"))
        if tag is None:
            return False
        if tag == "</function>":
            break
        key = yield from p.until((">",), _NAME_LIMIT)
        if key is None or not (yield from _value(p, call, key[0].strip(), "</parameter>", True)):
            return False
    if bare:
        p.close_call(call)  # complete: what follows is content unless it is the orphan tag
    if not (yield from p.ws()) or (yield from p.literal((p.fmt.call_end or "",))) is None:
        return False
    if not bare:
        p.close_call(call)
    return True


def _value(p: ToolParser, call: Any, key: str, stop: str, newlines: bool) -> _Block:
    """A parameter's text up to `stop`, as an argument of `call`. A string parameter streams as
    it comes; `newlines`: the template put a line break either side of the value (dropped)."""
    if not is_string(p.param_schema(call.name, key)):
        got = yield from p.until((stop,))
        if got is None:
            return False
        text = got[0].removeprefix("\n").removesuffix("\n") if newlines else got[0]
        p.add_argument(call, key, parameter_value(text, p.param_schema(call.name, key)))
        return True
    p.add_argument(call, key, text=True)
    cur, buf, lead = p.cur, "", newlines  # lead: a line break may still open the value
    while (yield from p.need()):
        buf, cur.i = buf + cur.s[cur.i :], len(cur.s)
        if lead:
            buf, lead = buf.removeprefix("\n"), False
        at = buf.find(stop)
        if at >= 0:
            cur.i -= len(buf) - at - len(stop)  # the stop ends in this piece
            text = buf[:at].removesuffix("\n") if newlines else buf[:at]
            p.argument_text(call, json.dumps(text, ensure_ascii=False)[1:])  # and the quote
            return True
        cut = len(buf) - partial_marker_len(buf, stop)
        if newlines and buf[:cut].endswith("\n"):
            cut -= 1  # it may be the template's line break before the stop
        p.argument_text(call, json.dumps(buf[:cut], ensure_ascii=False)[1:-1])
        buf = buf[cut:]
    return False


def glm45(p: ToolParser) -> _Block:
    """NAME\\n<arg_key>KEY</arg_key>\\n<arg_value>VALUE</arg_value>\\n...</tool_call>."""
    end = p.fmt.call_end or ""
    got = yield from p.until(("<arg_key>", end), _NAME_LIMIT)
    if got is None or not _named(p, got[0].strip()):
        return False
    name, stop = got[0].strip(), got[1]
    call = p.open_call(name)
    while stop == "<arg_key>":
        key = yield from p.until(("</arg_key>",), _NAME_LIMIT)
        if key is None or not (yield from p.ws()):
            return False
        if (yield from p.literal(("<arg_value>",))) is None:
            return False
        if not (yield from _value(p, call, key[0].strip(), "</arg_value>", False)):
            return False
        if not (yield from p.ws()):
            return False
        stop = yield from p.literal(("<arg_key>", end))
        if stop is None:
            return False
    p.close_call(call)
    return True


def deepseek(p: ToolParser) -> _Block:
    """<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\n{...}\\n```<｜tool▁call▁end｜> (V3,
    R1) or <｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{...}<｜tool▁call▁end｜> (V3.1), repeated, then
    <｜tool▁calls▁end｜>. Either is read, whichever the format's variant."""
    cur = p.cur
    if not (yield from p.ws()) or (yield from p.literal((DS_CALL_BEGIN,))) is None:
        return False
    while True:
        got = yield from p.until((DS_SEP,), _NAME_LIMIT)
        if got is None or not (yield from p.ws()):
            return False
        fenced = cur.s[cur.i] != "{"  # V3: "function<sep>" then the name on its own line
        name = got[0].strip()
        if fenced:
            if name != "function":  # V3's call type: stray markers before it are no call
                return False
            line = yield from p.until(("\n",), _NAME_LIMIT)
            if line is None or (yield from p.literal(("```json",))) is None:
                return False
            if not (yield from p.ws()):
                return False
            name = line[0].strip()
        if not _named(p, name) or cur.s[cur.i] != "{":
            return False
        if not (yield from p.call_object(name)) or not (yield from p.ws()):
            return False
        if fenced and ((yield from p.literal(("```",))) is None or not (yield from p.ws())):
            return False
        if (yield from p.literal((DS_CALL_END,))) is None or not (yield from p.ws()):
            return False
        following = yield from p.literal((DS_CALLS_END, DS_CALL_BEGIN))
        if following != DS_CALL_BEGIN:
            return following is not None


def harmony(p: ToolParser) -> _Block:
    """NAME <|constrain|>json<|message|>{...}<|call|> (after "<|channel|>commentary
    to=functions.", the form mlxrun.parsing.harmony hands call messages over in)."""
    cur = p.cur
    got = yield from p.until(("<|message|>",), _NAME_LIMIT)
    if got is None:
        return False
    name = re.split(r"[\s<]", got[0].strip(), maxsplit=1)[0]
    if not _named(p, name) or not (yield from p.ws()) or cur.s[cur.i] != "{":
        return False
    if not (yield from p.call_object(name)) or not (yield from p.ws()):
        return False
    return (yield from p.literal((p.fmt.call_end or "",))) is not None


def python_tag(p: ToolParser) -> _Block:
    """After Llama 3's <|python_tag|>: JSON call objects, or a built-in tool's call as the 3.1
    template writes it, NAME.call(key="value", ...), which runs to the end of the message."""
    cur = p.cur
    if not (yield from p.ws()):
        return False
    if cur.s[cur.i] == "{":
        return (yield from p.bare())
    text = ""
    while True:  # the call is the rest of the message (it ends with <|eom_id|>)
        text, cur.i = text + cur.s[cur.i :], len(cur.s)
        if cur.eof:
            break
        yield
    args = _builtin_call(text.strip())
    if args is None or not _named(p, args[0]):
        return False
    call = p.open_call(args[0])
    for key, value in args[1].items():
        p.add_argument(call, key, value)
    p.close_call(call)
    return True


def _builtin_call(text: str) -> tuple[str, dict[str, Any]] | None:
    """(name, keyword arguments) of `name.call(k=literal, ...)`, else None."""
    try:
        node = ast.parse(text, mode="eval").body
    except SyntaxError:
        return None
    ok = isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
    if not ok or node.func.attr != "call" or not isinstance(node.func.value, ast.Name) or node.args:
        return None
    try:
        kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords if k.arg}
    except ValueError:
        return None
    return node.func.value.id, kwargs


READERS: dict[str, Callable[[ToolParser], _Block]] = {
    "python_tag": python_tag,
    "xml": qwen3_coder,
    "glm": glm45,
    "deepseek": deepseek,
    "harmony": harmony,
}
