"""Message deltas -> Responses output items, and the stream events that build them.

One choice's reasoning, text and tool-call deltas (server/dialogue.py) become `reasoning`,
`message` and `function_call` items, each opened by response.output_item.added and closed by
response.output_item.done, with the part and delta events between that the openai SDK expects.
Non-streamed responses are built from the same events, so both carry the same items.
Whitespace-only text between items is dropped (a thinking model's blank line after </think>).
"""

from __future__ import annotations

from typing import Any

from mlxrun.parsing.tools import ToolCallDelta

from .dialogue import MessageDelta
from .protocol_responses import new_id


class OutputItems:
    def __init__(self, namespaces: dict[str, str] | None = None) -> None:
        self.namespaces = namespaces or {}  # tool name -> the namespace its calls name
        self.items: list[dict[str, Any]] = []
        self._open: str | None = None  # type of the open item (always the last one)
        self._calls: dict[int, int] = {}  # tool-call index -> its item's index
        self._pending = ""

    @property
    def reasoning_text(self) -> str:
        return "".join(
            p["text"] for it in self.items if it["type"] == "reasoning" for p in it["content"]
        )

    def push(self, d: MessageDelta) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if d.reasoning:
            if self._open != "reasoning":
                events += self._start_reasoning()
            events.append(self._text_delta("response.reasoning_text.delta", d.reasoning))
        if d.content:
            events += self._text(d.content)
        for call in d.tool_calls:
            events += self._call(call)
        return events

    def finish(self, incomplete: bool) -> list[dict[str, Any]]:
        """Close the open item; `incomplete` (cut off by max_output_tokens) marks it so."""
        events: list[dict[str, Any]] = []
        if not self.items and self._pending:  # nothing else was said: keep the whitespace
            events += self._start_message()
            events.append(self._text_delta("response.output_text.delta", self._pending))
        return events + self._close("incomplete" if incomplete else "completed")

    # ------------------------------------------------------------ opening

    def _add(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        events = self._close("completed")
        self.items.append(item)
        self._open = item["type"]
        added = {"type": "response.output_item.added", "output_index": len(self.items) - 1,
                 "item": _copy(item)}  # fmt: skip
        return [*events, added]

    def _part_added(self, part: dict[str, Any]) -> dict[str, Any]:
        item = self.items[-1]
        item["content"].append(part)
        return {"type": "response.content_part.added", **self._where(), "content_index": 0,
                "part": dict(part)}  # fmt: skip

    def _start_reasoning(self) -> list[dict[str, Any]]:
        item = {"id": new_id("rs"), "type": "reasoning", "summary": [], "content": [],
                "status": "in_progress"}  # fmt: skip
        events = self._add(item)
        return [*events, self._part_added({"type": "reasoning_text", "text": ""})]

    def _start_message(self) -> list[dict[str, Any]]:
        item = {"id": new_id("msg"), "type": "message", "role": "assistant",
                "status": "in_progress", "content": []}  # fmt: skip
        events = self._add(item)
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        return [*events, self._part_added(part)]

    # ------------------------------------------------------------ deltas

    def _where(self) -> dict[str, Any]:
        return {"item_id": self.items[-1]["id"], "output_index": len(self.items) - 1}

    def _text_delta(self, kind: str, text: str) -> dict[str, Any]:
        self.items[-1]["content"][0]["text"] += text
        event = {"type": kind, **self._where(), "content_index": 0, "delta": text}
        if kind == "response.output_text.delta":
            event["logprobs"] = []
        return event

    def _text(self, text: str) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if self._open != "message":
            text, self._pending = self._pending + text, ""
            if not text.strip():
                self._pending = text
                return []
            events += self._start_message()
        return [*events, self._text_delta("response.output_text.delta", text)]

    def _call(self, call: ToolCallDelta) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if call.index not in self._calls:
            if call.name is None:  # the rest of a call that broke off: its item is closed
                return []
            item = {"id": new_id("fc"), "type": "function_call",
                    "call_id": call.id or new_id("call"), "name": call.name, "arguments": "",
                    "status": "in_progress"}  # fmt: skip
            if call.name in self.namespaces:
                item["namespace"] = self.namespaces[call.name]
            events += self._add(item)
            self._calls[call.index] = len(self.items) - 1
        index = self._calls[call.index]
        if self._open != "function_call" or index != len(self.items) - 1:
            return events  # fragments after its item closed (text came between)
        if call.arguments:
            self.items[index]["arguments"] += call.arguments
            events.append({"type": "response.function_call_arguments.delta", **self._where(),
                           "delta": call.arguments})  # fmt: skip
        return events

    # ------------------------------------------------------------ closing

    def _close(self, status: str) -> list[dict[str, Any]]:
        if self._open is None:
            return []
        kind, self._open = self._open, None
        item, where = self.items[-1], self._where()
        item["status"] = status
        events: list[dict[str, Any]] = []
        if kind == "function_call":
            events.append({"type": "response.function_call_arguments.done", **where,
                           "name": item["name"], "arguments": item["arguments"]})  # fmt: skip
        else:
            part = item["content"][0]
            done = "response.output_text.done" if kind == "message" else (
                "response.reasoning_text.done")  # fmt: skip
            text_done = {"type": done, **where, "content_index": 0, "text": part["text"]}
            if kind == "message":
                text_done["logprobs"] = []
            events += [text_done, {"type": "response.content_part.done", **where,
                                   "content_index": 0, "part": dict(part)}]  # fmt: skip
        done_item = {"type": "response.output_item.done", "output_index": where["output_index"],
                     "item": _copy(item)}  # fmt: skip
        return [*events, done_item]


def _copy(item: dict[str, Any]) -> dict[str, Any]:
    """A snapshot of an item (events must not change when the item grows later)."""
    out = dict(item)
    if "content" in out:
        out["content"] = [dict(p) for p in out["content"]]
    return out
