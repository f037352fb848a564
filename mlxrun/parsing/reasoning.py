"""Reasoning models: split `<think>…</think>` out of generated text, streaming (and gpt-oss's
harmony channels, through mlxrun.parsing.harmony: the analysis channel is reasoning, final is content).

The block counts only at the start of the output (after whitespace), or from the first token when
the prompt already opened it (`starts_open`: DeepSeek-R1 style templates end with "<think>\\n").
Whitespace next to the markers is dropped; the markers themselves never reach either side.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

_WS = " \t\r\n"
# (start, end) pairs models use, first match wins.
_MARKERS: tuple[tuple[str, str], ...] = (("<think>", "</think>"),)


@dataclass(frozen=True)
class ReasoningFormat:
    start: str = "<think>"
    end: str = "</think>"
    starts_open: bool = False  # the generation prompt already opened the block
    token_ids: tuple[tuple[str, int], ...] = ()  # markers that are added tokens, and their ids
    kind: str = "think"  # "think" (start/end markers) or "harmony" (channels)


def template_texts(tokenizer: Any) -> list[str]:
    """Every chat template a checkpoint ships (default and named ones), as text."""
    found: list[str] = []
    raw = getattr(getattr(tokenizer, "backend", None), "chat_template", None)
    items: Iterable[Any] = (
        raw.values() if isinstance(raw, Mapping) else raw if isinstance(raw, list) else [raw]
    )
    for item in items:
        text = item.get("template") if isinstance(item, Mapping) else item
        if isinstance(text, str):
            found.append(text)
    default = getattr(tokenizer, "chat_template", None)
    if isinstance(default, str) and default not in found:
        found.append(default)
    return found


def detect_reasoning(tokenizer: Any, prompt_text: str | None = None) -> ReasoningFormat | None:
    """A format when the vocabulary or a chat template knows both markers; `starts_open` when the
    rendered prompt ends with the start marker (plus whitespace)."""
    vocab = tokenizer.backend.get_vocab()
    templates = "\n".join(template_texts(tokenizer))
    added = {t.content: i for i, t in tokenizer.backend.added_tokens_decoder.items()}
    if all(m in templates for m in ("<|channel|>", "<|message|>", "analysis")):
        from .harmony import HARMONY_TOKENS

        ids = tuple((m, added[m]) for m in HARMONY_TOKENS if m in added)
        return ReasoningFormat("<|channel|>analysis<|message|>", "<|end|>", False, ids, "harmony")
    for start, end in _MARKERS:
        if (start in vocab and end in vocab) or (start in templates and end in templates):
            is_open = prompt_text is not None and prompt_text.rstrip(_WS).endswith(start)
            ids = tuple((m, added[m]) for m in (start, end) if m in added)
            return ReasoningFormat(start, end, is_open, ids)
    return None


def think_rules(fmt: ReasoningFormat) -> str:
    """Lark rules (llguidance) for `think`: the reasoning block a constrained reply may open
    with; required when the prompt opened it. Use as `start: think <the reply's rule>`."""
    ids = dict(fmt.token_ids)

    def mark(m: str) -> str:  # an added token must be matched as one
        return f"<[{ids[m]}]>" if m in ids else json.dumps(m)

    if fmt.kind == "harmony":  # an analysis message, then the header of the next one
        head = f'{mark("<|channel|>")} "analysis" {mark("<|message|>")}'
        after = f'{mark("<|end|>")} {mark("<|start|>")} "assistant"'
        return f"think: ({head} THINK_TEXT {after})?\nTHINK_TEXT: /(.|\\n)*/\n"
    if fmt.end in ids:
        body, text = f"THINK_TEXT {mark(fmt.end)}", "THINK_TEXT: /(.|\\n)*/"
    else:  # the shortest text that ends with the end marker
        end = re.escape(fmt.end).replace("/", "\\/")
        body, text = "think_text", f"think_text[lazy]: /(.|\\n)*{end}/"
    block = body if fmt.starts_open else f"{mark(fmt.start)} {body}"
    optional = "" if fmt.starts_open else "?"
    return f"think: ({block} THINK_WS){optional}\n{text}\nTHINK_WS: /[ \\t\\r\\n]*/\n"


def partial_marker_len(text: str, marker: str) -> int:
    """Length of the longest proper prefix of `marker` that `text` ends with."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


_START, _THINK, _CONTENT = "start", "reasoning", "content"


class ReasoningParser:
    """Text in, (reasoning, content) deltas out; partial markers are held back until decided."""

    def __init__(self, fmt: ReasoningFormat):
        self.fmt = fmt
        self._channels = None
        if fmt.kind == "harmony":
            from .harmony import HarmonySplitter

            self._channels = HarmonySplitter()
        self.state = _THINK if fmt.starts_open else _START
        self._held = ""  # text not yet assigned to either side
        self._strip = True  # drop whitespace at the start of the current side

    @property
    def in_reasoning(self) -> bool:
        return self._channels.in_reasoning if self._channels else self.state == _THINK

    def push(self, text: str) -> tuple[str, str]:
        if self._channels:
            return self._channels.push(text)
        return self._feed(self._held + text, eof=False)

    def finish(self) -> tuple[str, str]:
        if self._channels:
            return self._channels.finish()
        return self._feed(self._held, eof=True)

    def _feed(self, s: str, eof: bool) -> tuple[str, str]:
        self._held = ""
        reasoning, content = [], []
        while s:
            if self.state == _START:
                s = self._opening(s, eof, content)
            elif self.state == _THINK:
                s = self._thinking(s, eof, reasoning)
            else:
                if self._strip:
                    s = s.lstrip(_WS)
                    self._strip = not s
                content.append(s)
                s = ""
        return "".join(reasoning), "".join(content)

    def _opening(self, s: str, eof: bool, content: list[str]) -> str:
        """Before any output: does it open with the start marker?"""
        body = s.lstrip(_WS)
        start = self.fmt.start
        if body.startswith(start):
            self.state, self._strip = _THINK, True
            return body[len(start) :]
        if not eof and start.startswith(body):
            self._held = s  # whitespace or a partial marker: wait
            return ""
        self.state, self._strip = _CONTENT, False
        return s

    def _thinking(self, s: str, eof: bool, reasoning: list[str]) -> str:
        if self._strip:
            s = s.lstrip(_WS)
            if not s:
                return ""
            self._strip = False
        end = self.fmt.end
        at = s.find(end)
        if at >= 0:
            reasoning.append(s[:at].rstrip(_WS))
            self.state, self._strip = _CONTENT, True
            return s[at + len(end) :]
        if eof:
            reasoning.append(s.rstrip(_WS))
            return ""
        keep = partial_marker_len(s, end)
        cut = len(s) - keep
        cut = len(s[:cut].rstrip(_WS))  # trailing whitespace waits too: it may precede the end
        reasoning.append(s[:cut])
        self._held = s[cut:]
        return ""
