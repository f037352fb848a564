"""Tool calls on the model side: which syntax a checkpoint writes calls in, a streaming parser from
generated text to OpenAI-style calls, and (from tool_grammar) a llguidance grammar that forces a
valid call.

Formats (what the model writes):
  hermes   <tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>   (Qwen, Hermes; repeated)
  llama3   {"name": "f", "parameters": {...}}   as the whole reply, optionally after <|python_tag|>,
           several joined by "; "
  mistral  [TOOL_CALLS][{"name": "f", "arguments": {...}}, ...]   (v3, Nemo), or, from v11 on,
           [TOOL_CALLS]f[ARGS]{...}  (optionally f[CALL_ID]abcdefghi[ARGS]{...}), one per call
  json     a bare call object as the reply (templates that mention tools in no known syntax)
The parser reads every syntax of its format's family and takes "arguments" or "parameters".

Arguments come out normalised, as json.dumps(..., ensure_ascii=False) writes them: the JSON is
re-written while it streams (jsonstream.JsonReader), so argument deltas can be sent before a call
ends and still add up to ToolCall.arguments.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Callable, Collection, Generator
from dataclasses import dataclass, replace
from typing import Any

from .errors import InvalidRequestError
from .jsonstream import DONE, ERROR, VALUE_END, VALUE_START, Cursor, JsonReader
from .jsonstream import WHITESPACE as _WS
from .reasoning import partial_marker_len, template_texts
from .tool_grammar import tool_call_grammar

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


@dataclass(frozen=True)
class ToolFormat:
    name: str  # "hermes", "llama3", "mistral", "json"
    call_start: str | None  # the marker that opens a call block
    call_end: str | None = None  # the marker that closes it
    args_key: str = "arguments"  # the member the grammar writes the arguments under
    bare_json: bool = False  # a call may be a bare JSON object (reply start, or after a call)
    args_marker: str | None = None  # "[ARGS]": the grammar writes name[ARGS]{...}
    call_id_marker: str | None = None  # "[CALL_ID]": ... and may put a call id before [ARGS]
    token_ids: tuple[tuple[str, int], ...] = ()  # markers that are added tokens, and their ids


_FORMATS: dict[str, ToolFormat] = {
    "hermes": ToolFormat("hermes", "<tool_call>", "</tool_call>"),
    "llama3": ToolFormat("llama3", "<|python_tag|>", args_key="parameters", bare_json=True),
    "mistral": ToolFormat("mistral", "[TOOL_CALLS]"),
    "json": ToolFormat("json", None, bare_json=True),
}
_ALIASES = {"qwen": "hermes", "llama": "llama3", "llama3_json": "llama3"}


def new_call_id() -> str:
    return "call_" + "".join(secrets.choice(_ID_CHARS) for _ in range(24))


# --- which format ---------------------------------------------------------------------------------


def _bind(fmt: ToolFormat, tokenizer: Any) -> ToolFormat:
    """`fmt` with the Mistral variant and the marker token ids of this tokenizer."""
    templates = "\n".join(template_texts(tokenizer))
    if fmt.name == "mistral":  # v7 vocabularies reserve [ARGS] but their templates write lists
        args = "[ARGS]" if "[ARGS]" in templates else None
        call_id = "[CALL_ID]" if args and "[CALL_ID]" in templates else None
        fmt = replace(fmt, args_marker=args, call_id_marker=call_id)
    added = {t.content: i for i, t in tokenizer.backend.added_tokens_decoder.items()}
    markers = (fmt.call_start, fmt.call_end, fmt.args_marker, fmt.call_id_marker)
    ids = tuple((m, added[m]) for m in markers if m is not None and m in added)
    return replace(fmt, token_ids=ids)


def detect_tool_format(tokenizer: Any) -> ToolFormat | None:
    """The format the chat template asks for, else (if it mentions tools) the vocabulary's."""
    templates = "\n".join(template_texts(tokenizer))
    if "[TOOL_CALLS]" in templates:
        name = "mistral"
    elif "<tool_call>" in templates:
        name = "hermes"
    elif "<|python_tag|>" in templates or '"parameters"' in templates:
        name = "llama3"
    elif re.search(r"\btools\b", templates):
        vocab = tokenizer.backend.get_vocab()
        markers = {"[TOOL_CALLS]": "mistral", "<tool_call>": "hermes", "<|python_tag|>": "llama3"}
        name = next((n for m, n in markers.items() if m in vocab), "json")
    else:
        return None
    return _bind(_FORMATS[name], tokenizer)


def tool_format_by_name(name: str, tokenizer: Any = None) -> ToolFormat:
    """A format by name (--tool-parser), bound to `tokenizer` when given."""
    fmt = _FORMATS.get(_ALIASES.get(name, name))
    if fmt is None:
        raise InvalidRequestError(
            f"unknown tool-call format {name!r}",
            param="tool_parser",
            hint=f"Use one of: {', '.join(sorted(_FORMATS))}.",
        )
    return fmt if tokenizer is None else _bind(fmt, tokenizer)


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

    def __init__(self, fmt: ToolFormat, tool_names: Collection[str] | None = None):
        self.fmt = fmt
        self._names = None if tool_names is None else frozenset(tool_names)
        self._markers = (fmt.call_start,) if fmt.call_start else ()
        self._cur = Cursor()
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
            block = (
                self._hermes()
                if self.fmt.call_end
                else (self._mistral() if self.fmt.name == "mistral" else self._bare())
            )
            end = at + len(marker)
            self._start(block, s[i + len(text) : end], end)
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

    def _start(self, block: _Block, head: str, raw_from: int) -> None:
        self._block, self._head, self._raw, self._raw_from = block, head, [], raw_from
        self._block_calls = 0
        self._lead = self._after_call = False

    def _run_block(self, s: str, i: int, eof: bool) -> tuple[str, int]:
        """Feed the block; returns the text and position to go on from."""
        cur = self._cur
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

    # Block readers: generators over self._cur that yield when they need more text and return
    # whether the block was well formed.

    def _need(self) -> _Block:
        cur = self._cur
        while cur.i >= len(cur.s):
            if cur.eof:
                return False
            yield
        return True

    def _ws(self) -> _Block:
        cur = self._cur
        while (yield from self._need()):
            if cur.s[cur.i] not in _WS:
                return True
            cur.i += 1
        return False

    def _literal(self, options: tuple[str, ...]) -> Generator[None, None, str | None]:
        cur, got = self._cur, ""
        while (yield from self._need()):
            got += cur.s[cur.i]
            if not any(o.startswith(got) for o in options):
                return None
            cur.i += 1
            if got in options:
                return got
        return None

    def _hermes(self) -> _Block:
        cur = self._cur
        if not (yield from self._ws()) or cur.s[cur.i] != "{":
            return False
        if not (yield from self._call_object()) or not (yield from self._ws()):
            return False
        return (yield from self._literal((self.fmt.call_end or "",))) is not None

    def _bare(self, bare: bool = False) -> _Block:
        cur = self._cur
        if not (yield from self._ws()) or cur.s[cur.i] != "{":
            return False
        return (yield from self._call_object(need_args=bare))

    def _mistral(self) -> _Block:
        cur = self._cur
        if not (yield from self._ws()):
            return False
        if cur.s[cur.i] == "{":
            return (yield from self._call_object())
        if cur.s[cur.i] != "[":
            return (yield from self._named_call())
        cur.i += 1
        while True:  # [{call}, {call}, ...]
            if not (yield from self._ws()) or cur.s[cur.i] != "{":
                return False
            if not (yield from self._call_object()) or not (yield from self._ws()):
                return False
            c = cur.s[cur.i]
            if c not in ",]":
                return False
            cur.i += 1
            if c == "]":
                return True

    def _named_call(self) -> _Block:
        """name[ARGS]{...}, name[CALL_ID]id[ARGS]{...} or name{...} (Mistral v11+)."""
        cur, name = self._cur, ""
        while (yield from self._need()) and cur.s[cur.i] in _NAME_CHARS:
            name += cur.s[cur.i]
            cur.i += 1
        if not self._allowed(name) or not (yield from self._ws()):
            return False
        if cur.s[cur.i] == "[":
            marker = yield from self._literal(("[ARGS]", "[CALL_ID]"))
            if marker == "[CALL_ID]":
                while (yield from self._need()) and cur.s[cur.i] in _ID_CHARS:
                    cur.i += 1
                marker = yield from self._literal(("[ARGS]",))
            if marker is None or not (yield from self._ws()):
                return False
        if cur.s[cur.i] != "{":
            return False
        return (yield from self._call_object(name))

    def _allowed(self, name: Any) -> bool:
        return isinstance(name, str) and bool(name) and (self._names is None or name in self._names)

    def _call_object(self, name: str | None = None, need_args: bool = False) -> _Block:
        """At "{": a call object {"name": ..., "arguments": {...}} (`need_args`: the arguments
        member must be there); or, given `name`, the arguments object itself."""
        cur, reader = self._cur, JsonReader()
        call = _Pending(name, args_at=None if name is None else 0)
        while True:
            if not (yield from self._need()):
                return False
            ev = reader.feed(cur)
            if ev == ERROR or (name is None and not _member(ev, reader, call, self._allowed)):
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
                args = "".join(pieces[call.args_at : call.args_end])
                self._calls.append(ToolCall(call.id, call.name, args))
                self._head, self._raw, self._raw_from = "", [], cur.i
                self._block_calls += 1
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
