"""A streaming JSON reader: one object, fed a piece at a time, re-written as it goes into the text
json.dumps(..., ensure_ascii=False) would give, so a consumer can pass on parts of it (tool-call
argument deltas) before the object ends and still have them add up to the normalised whole.

Surface: Cursor (the text to read and how far it is read), JsonReader.feed(cursor) -> an event
(MORE, ERROR, VALUE_START, VALUE_END, DONE), and JsonReader's pieces/key/value_start/first_char.
"""

from __future__ import annotations

import json
import re
import string

__all__ = [
    "DONE",
    "ERROR",
    "MORE",
    "VALUE_END",
    "VALUE_START",
    "WHITESPACE",
    "Cursor",
    "JsonReader",
]

# Events JsonReader.feed returns: it needs more text, the text is not JSON, a top-level member's
# value began / ended, the object is complete.
MORE, ERROR, VALUE_START, VALUE_END, DONE = range(5)
WHITESPACE = " \t\r\n"

_VALUE, _KEY, _COLON, _NEXT, _STRING, _SCALAR, _END = range(7)  # reader states
_PLAIN = re.compile(r'[^"\\\x00-\x1f]+')
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?\Z")
_NUM_CHARS = frozenset("0123456789+-.eE")
_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_LITERALS = ("true", "false", "null")


def _canon_char(c: str) -> str:
    if c in '"\\' or c < " ":
        return json.dumps(c)[1:-1]
    if "\ud800" <= c <= "\udfff":  # a lone surrogate: keep the text encodable
        return f"\\u{ord(c):04x}"
    return c


def _canon_number(tok: str) -> str:
    if not any(c in tok for c in ".eE"):
        return str(int(tok))
    value = float(tok)
    return repr(value) if value not in (float("inf"), float("-inf")) else tok


class Cursor:
    """The text being read: s[i:] is unread; eof means no more will come."""

    def __init__(self) -> None:
        self.s, self.i, self.eof = "", 0, False


class JsonReader:
    """Reads one JSON object, a piece at a time, into `pieces`: its json.dumps form. Stops at
    events about the top-level members (`key`, `value_start` index into pieces, `first_char`)."""

    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.key: str | None = None
        self.value_start = 0
        self.first_char = ""
        self._stack: list[str] = []
        self._state = _VALUE
        self._first = True  # the innermost container has no item yet
        self._is_key = False
        self._keybuf: list[str] | None = None  # a top-level key being read
        self._esc = ""  # an escape sequence read so far
        self._high = ""  # a high surrogate waiting for its pair
        self._tok = ""  # a number or literal read so far

    def feed(self, cur: Cursor) -> int:
        s, n = cur.s, len(cur.s)
        while cur.i < n:
            ev = self._string(s, cur) if self._state == _STRING else self._step(s[cur.i], cur)
            if ev != MORE:
                return ev
        return MORE

    def _step(self, c: str, cur: Cursor) -> int:
        st = self._state
        if st == _SCALAR:
            return self._scalar(c, cur)
        if c in WHITESPACE:
            cur.i += 1
            return MORE
        if st == _VALUE:
            return self._value(c, cur)
        if st == _KEY and c == '"':
            self.pieces.append('"' if self._first else ', "')
            self._state, self._is_key = _STRING, True
            self._keybuf = [] if len(self._stack) == 1 else None
        elif st == _KEY and c == "}" and self._first:
            return self._close(c, cur)
        elif st == _COLON and c == ":":
            self.pieces.append(": ")
            self._state = _VALUE
        elif st == _NEXT and c == ",":
            self._first = False
            self._state = _KEY if self._stack[-1] == "{" else _VALUE
        elif st == _NEXT and c == ("}" if self._stack[-1] == "{" else "]"):
            return self._close(c, cur)
        else:
            return ERROR
        cur.i += 1
        return MORE

    def _value(self, c: str, cur: Cursor) -> int:
        depth = len(self._stack)
        if depth == 0 and c != "{":
            return ERROR
        if depth and self._stack[-1] == "[":
            if c == "]" and self._first:
                return self._close(c, cur)
            if not self._first:
                self.pieces.append(", ")
        mark = len(self.pieces)
        if c in "{[":
            self._stack.append(c)
            self.pieces.append(c)
            self._state, self._first = (_KEY if c == "{" else _VALUE), True
        elif c == '"':
            self.pieces.append(c)
            self._state, self._is_key = _STRING, False
        elif c in "-0123456789tfn":
            self._state, self._tok = _SCALAR, c
        else:
            return ERROR
        cur.i += 1
        if depth == 1:
            self.value_start, self.first_char = mark, c
            return VALUE_START
        return MORE

    def _scalar(self, c: str, cur: Cursor) -> int:
        tok = self._tok
        if tok[0] in "tfn":
            if not any(w.startswith(tok + c) for w in _LITERALS):
                return ERROR
            cur.i += 1
            self._tok = tok = tok + c
            if tok not in _LITERALS:
                return MORE
            self.pieces.append(tok)
            return self._value_done()
        if c in _NUM_CHARS:
            self._tok += c
            cur.i += 1
            return MORE
        if not _NUMBER.match(tok):
            return ERROR
        self.pieces.append(_canon_number(tok))
        return self._value_done()  # c is read again, as what follows the number

    def _string(self, s: str, cur: Cursor) -> int:
        if self._esc:
            return self._escape(s[cur.i], cur)
        m = _PLAIN.match(s, cur.i)
        if m:
            self._text(m.group(), m.group())
            cur.i = m.end()
            return MORE
        c = s[cur.i]
        cur.i += 1
        if c == "\\":
            self._esc = c
            return MORE
        if c != '"':
            self._char(c)  # a raw control character: tolerated, written escaped
            return MORE
        self._text("", "")  # flushes a lone high surrogate
        self.pieces.append('"')
        if not self._is_key:
            return self._value_done()
        if self._keybuf is not None:
            self.key, self._keybuf = "".join(self._keybuf), None
        self._state = _COLON
        return MORE

    def _escape(self, c: str, cur: Cursor) -> int:
        esc = self._esc + c
        if len(esc) == 2 and c != "u":
            if c not in _ESCAPES:
                return ERROR
            self._esc = ""
            self._char(_ESCAPES[c])
        elif len(esc) > 2 and c not in string.hexdigits:
            return ERROR
        elif len(esc) == 6:
            self._esc = ""
            self._char(chr(int(esc[2:], 16)))
        else:
            self._esc = esc
        cur.i += 1
        return MORE

    def _char(self, c: str) -> None:
        """One decoded character; UTF-16 surrogate pairs from \\u escapes are joined."""
        if self._high and "\udc00" <= c <= "\udfff":
            high, self._high = self._high, ""
            c = chr(0x10000 + ((ord(high) - 0xD800) << 10) + (ord(c) - 0xDC00))
        elif "\ud800" <= c <= "\udbff":
            self._text("", "")
            self._high = c
            return
        self._text(c, _canon_char(c))

    def _text(self, decoded: str, canonical: str) -> None:
        if self._high:
            high, self._high = self._high, ""
            self._text(high, _canon_char(high))
        if canonical:
            self.pieces.append(canonical)
            if self._keybuf is not None:
                self._keybuf.append(decoded)

    def _value_done(self) -> int:
        self._state = _NEXT
        return VALUE_END if len(self._stack) == 1 else MORE

    def _close(self, c: str, cur: Cursor) -> int:
        self.pieces.append(c)
        self._stack.pop()
        cur.i += 1
        if not self._stack:
            self._state = _END
            return DONE
        return self._value_done()
