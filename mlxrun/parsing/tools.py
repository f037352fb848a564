"""Tool calls on the model side: a streaming parser from generated text to OpenAI-style calls.
Which syntax a checkpoint writes calls in is tool_formats' business (formats listed there); the
grammar that forces a valid call is tool_grammar's; readers for the non-JSON syntaxes (XML
parameters, DeepSeek, harmony) live in tool_readers and drive this parser's cursor.

JSON arguments come out normalised, as json.dumps(..., ensure_ascii=False) writes them: the JSON is
re-written while it streams (jsonstream.JsonReader), so argument deltas can be sent before a call
ends and still add up to ToolCall.arguments. Key/value syntaxes send one delta per parameter.
"""

from __future__ import annotations

import json
import secrets
import string
from collections.abc import Callable, Collection, Generator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from .jsonstream import DONE, ERROR, VALUE_END, VALUE_START, Cursor, JsonReader
from .jsonstream import WHITESPACE as _WS
from .reasoning import partial_marker_len
from .tool_formats import ToolFormat, detect_tool_format, tool_format_by_name
from .tool_grammar import tool_call_grammar, tool_schemas
from .tool_readers import READERS

__all__ = [
    "ToolCall",
    "ToolCallDelta",
    "ToolFormat",
    "ToolParser",
    "detect_tool_format",
    "new_call_id",
    "parse_tool_calls",
    "tool_call_grammar",
    "tool_format_by_name",
    "tool_schemas",
]

_ARGS_KEYS = ("arguments", "parameters")
_ID_CHARS = string.ascii_letters + string.digits
_NAME_CHARS = frozenset(_ID_CHARS + "_.-")


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text of the arguments object


@dataclass(frozen=True)
class ToolCallDelta:
    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


def new_call_id() -> str:
    return "call_" + "".join(secrets.choice(_ID_CHARS) for _ in range(24))


# --- parsing --------------------------------------------------------------------------------------

_Block = Generator[None, None, bool]


class ToolParser:
    """Generated text in, (content, tool-call deltas) out, streaming.

    Text that may begin a call is held back until decided. A call's first delta carries its id,
    name and the start of its arguments; later ones carry argument fragments as they arrive. Text
    that turns out not to be a valid call (bad JSON, arguments not an object, a name outside
    `tool_names`, cut off) comes back as content; whitespace next to a call is dropped. A call
    that breaks after its deltas began (e.g. cut off by max_tokens) leaves those deltas without a
    ToolCall in `calls`: `calls` is the authority on complete calls.
    """

    def __init__(
        self, fmt: ToolFormat, tool_names: Collection[str] | Mapping[str, Any] | None = None
    ):
        """`tool_names`: the callable names, or a mapping of them to their parameters schemas
        (which key/value syntaxes need to tell a string "1" from the number 1)."""
        self.fmt = fmt
        self._names = None if tool_names is None else frozenset(tool_names)
        self._params = dict(tool_names) if isinstance(tool_names, Mapping) else {}
        self._markers = tuple(m for m in (fmt.call_start, fmt.alt_start) if m)
        self.opened_by = ""  # the marker that opened the block being read
        self.cur = Cursor()
        self._held = ""  # undecided content: trailing whitespace, a partial marker
        self._lead = fmt.bare_json  # a bare JSON call may start here
        self._after_call = False  # whitespace (and ";") here follows a call: dropped
        self._block: _Block | None = None  # reading a call block
        self._head = ""  # the block's opening (content if the block fails)...
        self._raw: list[str] = []  # ...and its text since then or its last complete call,
        self._raw_from = 0  # continued in cur.s from here (scanned again if the block fails)
        self._block_calls = 0
        self._content: list[str] = []
        self._deltas: list[ToolCallDelta] = []
        self._calls: list[ToolCall] = []
        self._next_index = 0

    @property
    def calls(self) -> list[ToolCall]:
        return list(self._calls)

    def push(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        self._feed(text, eof=False)
        return self._take()

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        self._feed("", eof=True)
        return self._take()

    def _take(self) -> tuple[str, list[ToolCallDelta]]:
        content, self._content = "".join(self._content), []
        deltas: list[ToolCallDelta] = []
        for d in self._deltas:  # one delta per call per push
            if deltas and deltas[-1].index == d.index and d.id is None:
                deltas[-1] = replace(deltas[-1], arguments=deltas[-1].arguments + d.arguments)
            else:
                deltas.append(d)
        self._deltas = []
        return content, deltas

    def _feed(self, text: str, eof: bool) -> None:
        s, i, self._held = self._held + text, 0, ""
        while True:
            if self._block is not None:
                s, i = self._run_block(s, i, eof)
                if self._block is not None:
                    return
            if i >= len(s):
                return
            i = (
                self._between(s, i, eof)
                if self._lead or self._after_call
                else self._scan(s, i, eof)
            )

    def _between(self, s: str, i: int, eof: bool) -> int:
        """At the reply's start or after a call: whitespace, then maybe a bare JSON call."""
        skip = _WS + ";" if self._after_call and self.fmt.bare_json else _WS
        j = i
        while j < len(s) and s[j] in skip:
            j += 1
        if j == len(s) and not eof:
            if not self._after_call:
                self._held = s[i:]
            return j
        if j < len(s) and self._lead and s[j] == "{":
            head = "{" if self._after_call else s[i : j + 1]
            self._start(self._bare(bare=True), head, j + 1)
            return j
        at = j if self._after_call else i
        self._lead = self._after_call = False
        return at

    def _scan(self, s: str, i: int, eof: bool) -> int:
        """Content: look for a call marker; hold back a partial one and whitespace before it."""
        found = [(s.find(m, i), m) for m in self._markers]
        at, marker = min(((a, m) for a, m in found if a >= 0), default=(-1, ""))
        if at >= 0:
            text = s[i:at].rstrip(_WS)
            self._content.append(text)
            end = at + len(marker)
            self.opened_by = marker
            self._start(self._reader(), s[i + len(text) : end], end)
            return at + len(marker)
        if eof:
            self._content.append(s[i:])
            return len(s)
        tail = s[i:]
        keep = max((partial_marker_len(tail, m) for m in self._markers), default=0)
        cut = i + len(tail[: len(tail) - keep].rstrip(_WS))
        self._content.append(s[i:cut])
        self._held = s[cut:]
        return len(s)

    def _reader(self) -> _Block:
        """The block reader for what follows the format's call marker."""
        if self.fmt.syntax != "json":
            return READERS[self.fmt.syntax](self)
        if self.fmt.call_end:
            return self._hermes()
        return self._mistral() if self.fmt.name in ("mistral", "granite") else self._bare()

    def _start(self, block: _Block, head: str, raw_from: int) -> None:
        self._block, self._head, self._raw, self._raw_from = block, head, [], raw_from
        self._block_calls = 0
        self._lead = self._after_call = False

    def _run_block(self, s: str, i: int, eof: bool) -> tuple[str, int]:
        """Feed the block; returns the text and position to go on from."""
        cur = self.cur
        cur.s, cur.i, cur.eof = s, i, eof
        try:
            self._block.send(None)  # type: ignore[union-attr]
        except StopIteration as stop:
            self._block = None
            called = self._block_calls > 0
            self._after_call, self._lead = called, called and self.fmt.bare_json
            if stop.value:
                return s, cur.i
            # Not a call after all: its opening is content, and what follows is read again.
            self._content.append(self._head)
            rest = "".join(self._raw) + s[self._raw_from :]
            self._raw = []
            return rest, 0
        self._raw.append(s[self._raw_from :])
        self._raw_from = 0
        return s, len(s)

    # Block readers: generators over self.cur that yield when they need more text and return
    # whether the block was well formed. need/ws/literal/until/call_object and the call
    # builders below are also what tool_readers' readers are made of.

    def need(self) -> _Block:
        cur = self.cur
        while cur.i >= len(cur.s):
            if cur.eof:
                return False
            yield
        return True

    def ws(self) -> _Block:
        cur = self.cur
        while (yield from self.need()):
            if cur.s[cur.i] not in _WS:
                return True
            cur.i += 1
        return False

    def literal(self, options: tuple[str, ...]) -> Generator[None, None, str | None]:
        cur, got = self.cur, ""
        while (yield from self.need()):
            got += cur.s[cur.i]
            if not any(o.startswith(got) for o in options):
                return None
            cur.i += 1
            if got in options:
                return got
        return None

    def until(
        self, stops: tuple[str, ...], limit: int | None = None
    ) -> Generator[None, None, tuple[str, str] | None]:
        """The text up to the first of `stops`, and that stop (both consumed); None at the end of
        the text or past `limit` characters."""
        cur, got = self.cur, ""
        while (yield from self.need()):
            start = len(got)
            got += cur.s[cur.i :]
            cur.i = len(cur.s)
            found = [(got.find(t, max(0, start - len(t) + 1)), t) for t in stops]
            at, stop = min(((a, t) for a, t in found if a >= 0), default=(-1, ""))
            if at >= 0:
                cur.i -= (
                    len(got) - at - len(stop)
                )  # the stop ends in this piece: give back the rest
                return got[:at], stop
            if limit is not None and len(got) > limit + max(map(len, stops)):
                return None
        return None

    def hermes(self) -> _Block:
        return (yield from self._hermes())

    def param_schema(self, name: str, key: str) -> Mapping[str, Any] | None:
        """The schema of parameter `key` of tool `name`, when known."""
        props = self._params.get(name, {}).get("properties")
        return props.get(key) if isinstance(props, Mapping) else None

    def open_call(self, name: str) -> _Pending:
        """A call whose arguments come as key/value pairs: its first delta goes out now."""
        call = _Pending(name, index=self._next_index, id=new_call_id())
        self._next_index += 1
        self._deltas.append(ToolCallDelta(call.index, call.id, name, "{"))
        call.pieces.append("{")
        return call

    def add_argument(self, call: _Pending, key: str, value: Any = None, text: bool = False) -> None:
        """`"key": value` (or, with `text`, `"key": "` and the string's characters to come)."""
        head = json.dumps(key, ensure_ascii=False) + ": "
        self.argument_text(call, (", " if call.sent else "") + head)
        call.sent += 1
        self.argument_text(call, '"' if text else json.dumps(value, ensure_ascii=False))

    def argument_text(self, call: _Pending, piece: str) -> None:
        if piece:
            call.pieces.append(piece)
            self._deltas.append(ToolCallDelta(call.index, arguments=piece))

    def close_call(self, call: _Pending) -> None:
        self.argument_text(call, "}")
        self._complete(call, "".join(call.pieces))

    def _complete(self, call: _Pending, args: str) -> None:
        self._calls.append(ToolCall(call.id, call.name, args))
        self._head, self._raw, self._raw_from = "", [], self.cur.i
        self._block_calls += 1

    def _hermes(self) -> _Block:
        cur = self.cur
        if not (yield from self.ws()) or cur.s[cur.i] != "{":
            return False
        if not (yield from self.call_object()) or not (yield from self.ws()):
            return False
        return (yield from self.literal((self.fmt.call_end or "",))) is not None

    def bare(self) -> _Block:
        return (yield from self._bare())

    def _bare(self, bare: bool = False) -> _Block:
        cur = self.cur
        if not (yield from self.ws()) or cur.s[cur.i] != "{":
            return False
        return (yield from self.call_object(need_args=bare))

    def _mistral(self) -> _Block:
        """A call object, a list of them, or (Mistral v11+ only) name[ARGS]{...}."""
        cur = self.cur
        if not (yield from self.ws()):
            return False
        if cur.s[cur.i] == "{":
            return (yield from self.call_object())
        if cur.s[cur.i] != "[":
            return self.fmt.name == "mistral" and (yield from self._named_call())
        cur.i += 1
        while True:  # [{call}, {call}, ...]
            if not (yield from self.ws()) or cur.s[cur.i] != "{":
                return False
            if not (yield from self.call_object()) or not (yield from self.ws()):
                return False
            c = cur.s[cur.i]
            if c not in ",]":
                return False
            cur.i += 1
            if c == "]":
                return True

    def _named_call(self) -> _Block:
        """name[ARGS]{...}, name[CALL_ID]id[ARGS]{...} or name{...} (Mistral v11+)."""
        cur, name = self.cur, ""
        while (yield from self.need()) and cur.s[cur.i] in _NAME_CHARS:
            name += cur.s[cur.i]
            cur.i += 1
        if not self.allowed(name) or not (yield from self.ws()):
            return False
        if cur.s[cur.i] == "[":
            marker = yield from self.literal(("[ARGS]", "[CALL_ID]"))
            if marker == "[CALL_ID]":
                while (yield from self.need()) and cur.s[cur.i] in _ID_CHARS:
                    cur.i += 1
                marker = yield from self.literal(("[ARGS]",))
            if marker is None or not (yield from self.ws()):
                return False
        if cur.s[cur.i] != "{":
            return False
        return (yield from self.call_object(name))

    def allowed(self, name: Any) -> bool:
        return isinstance(name, str) and bool(name) and (self._names is None or name in self._names)

    def call_object(self, name: str | None = None, need_args: bool = False) -> _Block:
        """At "{": a call object {"name": ..., "arguments": {...}} (`need_args`: the arguments
        member must be there); or, given `name`, the arguments object itself."""
        cur, reader = self.cur, JsonReader()
        call = _Pending(name, args_at=None if name is None else 0)
        while True:
            if not (yield from self.need()):
                return False
            ev = reader.feed(cur)
            if ev == ERROR or (name is None and not _member(ev, reader, call, self.allowed)):
                return False
            pieces = reader.pieces
            if ev == DONE:
                if call.name is None or (need_args and call.args_at is None):
                    return False
                if call.args_at is None:  # no arguments member: a call without arguments
                    pieces.append("{}")
                    call.args_at = len(pieces) - 1
                call.args_end = len(pieces) if call.args_end is None else call.args_end
            self._stream(call, pieces)
            if ev == DONE:
                self._complete(call, "".join(pieces[call.args_at : call.args_end]))
                return True

    def _stream(self, call: _Pending, pieces: list[str]) -> None:
        """Deltas for the argument text read since the last ones, once the name is known."""
        if call.name is None or call.args_at is None:
            return
        upto = len(pieces) if call.args_end is None else call.args_end
        if call.index < 0:
            call.index, call.id = self._next_index, new_call_id()
            self._next_index += 1
            text = "".join(pieces[call.args_at : upto])
            self._deltas.append(ToolCallDelta(call.index, call.id, call.name, text))
        elif upto > call.sent:
            self._deltas.append(
                ToolCallDelta(call.index, arguments="".join(pieces[call.sent : upto]))
            )
        call.sent = upto


@dataclass
class _Pending:
    """A call being read: its name, and where its arguments sit in the reader's pieces."""

    name: Any = None
    args_at: int | None = None
    args_end: int | None = None
    name_at: int | None = None
    index: int = -1
    id: str = ""
    sent: int = 0
    pieces: list[str] = field(default_factory=list)  # key/value calls: "key": value texts


def _member(ev: int, reader: JsonReader, call: _Pending, allowed: Callable[[Any], bool]) -> bool:
    """Note the "name" and arguments members of a call object; False when it cannot be a call."""
    if ev == VALUE_START:
        if reader.key == "name" and call.name_at is None:
            call.name_at = reader.value_start
        elif reader.key in _ARGS_KEYS and call.args_at is None:
            if reader.first_char != "{":
                return False
            call.args_at = reader.value_start
    elif ev == VALUE_END:
        if reader.key == "name" and call.name is None:
            call.name = json.loads("".join(reader.pieces[call.name_at :]))
            return allowed(call.name)
        if reader.key in _ARGS_KEYS and call.args_at is not None and call.args_end is None:
            call.args_end = len(reader.pieces)
    return True


def parse_tool_calls(
    fmt: ToolFormat, text: str, tool_names: Collection[str] | None = None
) -> tuple[str, list[ToolCall]]:
    """(content, calls) of a whole generated text."""
    parser = ToolParser(fmt, tool_names)
    head, _ = parser.push(text)
    tail, _ = parser.finish()
    return head + tail, parser.calls
