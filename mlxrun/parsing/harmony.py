"""gpt-oss "harmony" output, split by channel, streaming.

The generation prompt ends with `<|start|>assistant`; the model then writes messages such as
  <|channel|>analysis<|message|>thinking...<|end|>
  <|start|>assistant<|channel|>final<|message|>the answer<|return|>
  <|start|>assistant<|channel|>commentary to=functions.f <|constrain|>json<|message|>{...}<|call|>
(or, as the chat template writes past calls, `<|start|>assistant to=functions.f<|channel|>commentary
json<|message|>`). The analysis channel is reasoning; final and recipient-less commentary (preambles)
are content; a message to a functions.* recipient is a tool call (one to a built-in tool, browser
or python, counts as reasoning), handed to the tool parser as content in one canonical form,
`<|channel|>commentary to=RECIPIENT <|constrain|>json<|message|>BODY<|call|>`, so that it reads
one syntax (tool_formats' gpt_oss). Text that does not open with a header is plain content.
"""

from __future__ import annotations

import re

from .reasoning import partial_marker_len

__all__ = ["HARMONY_TOKENS", "HarmonySplitter"]

HARMONY_TOKENS = (
    "<|start|>",
    "<|channel|>",
    "<|message|>",
    "<|constrain|>",
    "<|end|>",
    "<|call|>",
    "<|return|>",
)
_MESSAGE = "<|message|>"
_ENDS = ("<|end|>", "<|call|>", "<|return|>")
_NEXT = ("<|start|>", "<|channel|>")  # a header the model began without ending the message
_OPENINGS = ("<|channel|>", "<|start|>", " to=", "to=")
_HEADER_LIMIT = 256  # a header longer than this is not one
_CHANNEL = re.compile(r"<\|channel\|>\s*(\w+)")
_RECIPIENT = re.compile(r"\bto=([^\s<]+)")
_HEADER, _BODY, _PLAIN = range(3)


class HarmonySplitter:
    """Text in, (reasoning, content) deltas out; partial markers are held back until decided."""

    def __init__(self) -> None:
        self._state = _HEADER
        self._held = ""
        self._first = True  # nothing decided yet: plain text is possible
        self._channel = ""
        self._recipient: str | None = None

    @property
    def in_reasoning(self) -> bool:
        return self._state == _BODY and self._channel == "analysis" and not self._recipient

    def push(self, text: str) -> tuple[str, str]:
        return self._feed(self._held + text, eof=False)

    def finish(self) -> tuple[str, str]:
        return self._feed(self._held, eof=True)

    def _feed(self, s: str, eof: bool) -> tuple[str, str]:
        self._held = ""
        out: tuple[list[str], list[str]] = ([], [])
        while True:
            if self._state == _PLAIN:
                out[1].append(s)
                break
            if self._state == _HEADER:
                if not s:
                    break
                s = self._header(s, eof, out[1])
                if not s and self._state == _HEADER:
                    break  # held back: the header is not complete
            else:
                s = self._body(s, eof, out)
                if self._state == _BODY:
                    break  # held back, or waiting for more of the message
        return "".join(out[0]), "".join(out[1])

    def _header(self, s: str, eof: bool, content: list[str]) -> str:
        if self._first and not any(o.startswith(s[: len(o)]) for o in _OPENINGS):
            self._state = _PLAIN  # the reply does not open with a header: not harmony
            return s
        at = s.find(_MESSAGE)
        if at < 0 or at > _HEADER_LIMIT:
            if len(s) > _HEADER_LIMIT or eof:
                self._state = _PLAIN  # a header cut off, or none: content
                return s
            self._held = s
            return ""
        header, self._first = s[:at], False
        channel = _CHANNEL.search(header)
        recipient = _RECIPIENT.search(header)
        self._channel = channel.group(1) if channel else ""
        self._recipient = recipient.group(1) if recipient else None
        if self._recipient and not self._recipient.startswith("functions."):
            # A built-in tool (browser, python) the client cannot run: the model's own work.
            self._channel, self._recipient = "analysis", None
        if self._recipient:
            content.append(
                f"<|channel|>commentary to={self._recipient} <|constrain|>json{_MESSAGE}"
            )
        self._state = _BODY
        return s[at + len(_MESSAGE) :]

    def _body(self, s: str, eof: bool, out: tuple[list[str], list[str]]) -> str:
        side = out[0] if self._channel == "analysis" and not self._recipient else out[1]
        found = [(s.find(m), m) for m in (*_ENDS, *_NEXT)]
        at, marker = min(((a, m) for a, m in found if a >= 0), default=(-1, ""))
        if at < 0 and not eof:
            keep = max(partial_marker_len(s, m) for m in (*_ENDS, *_NEXT))
            side.append(s[: len(s) - keep])
            self._held = s[len(s) - keep :]
            return ""
        side.append(s if at < 0 else s[:at])
        if self._recipient:
            out[1].append("<|call|>")
        self._state, self._recipient = _HEADER, None
        if at < 0:
            return ""
        return s[at + len(marker) :] if marker in _ENDS else s[at:]
