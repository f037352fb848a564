"""`mlxrun doctor`'s Codex CLI checks and config snippet: Codex speaks only the Responses API.

Codex sends its whole conversation each turn (store false) as input items, with function tools,
and reads the typed stream events: it acts on response.output_item.done items and needs
response.completed (with usage) to end a turn. The checks replay that shape; the call is forced
with tool_choice so any model finishes it.
"""

from __future__ import annotations

import json
from typing import Any

from mlxrun.doctor.probe import Check, Ctx, expect, need, parse, short, sse_events

CITIES = ["Paris", "Tokyo", "Lima"]
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "enum": CITIES}},
           "required": ["city"], "additionalProperties": False}  # fmt: skip
TOOLS = [{"type": "function", "name": "get_weather", "description": "Current weather in a city.",
          "strict": False, "parameters": WEATHER}]  # fmt: skip
INSTRUCTIONS = "You are a coding agent running in a terminal."
ASK = [{"type": "message", "role": "user",
        "content": [{"type": "input_text", "text": "What is the weather in Paris?"}]}]  # fmt: skip
ROUND = [*ASK, {"type": "function_call", "call_id": "call_1", "name": "get_weather",
                "arguments": '{"city": "Paris"}'},
         {"type": "function_call_output", "call_id": "call_1", "output": "18 C, sunny"}]  # fmt: skip
ITEMS = {"message", "reasoning", "function_call"}
ENDS = ("response.completed", "response.incomplete", "response.failed")
CALL, SHORT = 100, 16  # max output tokens: one forced call; a plain answer


def _body(ctx: Ctx, items: list[dict], **kw: Any) -> dict:
    """What Codex sends (codex-rs ResponsesApiRequest), with its session's cache key."""
    return {"model": ctx.model, "instructions": INSTRUCTIONS, "input": items, "tools": TOOLS,
            "tool_choice": "auto", "parallel_tool_calls": False, "store": False, "stream": True,
            "include": ["reasoning.encrypted_content"], "prompt_cache_key": "mlxrun-doctor",
            "temperature": 0, **kw}  # fmt: skip


def _stream(ctx: Ctx, body: dict) -> tuple[list[dict], dict]:
    """Checks the event sequence; returns the finished items and the final response."""
    added: dict[int, dict] = {}
    done: dict[int, dict] = {}
    last: dict = {}
    for number, (name, data) in enumerate(sse_events(ctx, "/v1/responses", body)):
        ev = parse(data)
        kind = ev.get("type")
        expect(kind != "error", f"error event: {short(ev)}")
        expect(name == kind, f"an event's `event:` line says {name!r}, its data {kind!r}")
        need(ev, {"sequence_number": number}, kind)
        expect((kind == "response.created") == (number == 0), "response.created is not first")
        expect(not last, f"{kind} follows {last.get('type')}")
        if kind == "response.output_item.added":
            need(ev, {"output_index": int, "item.type": ITEMS}, kind)
            expect(ev["output_index"] not in added, "output_item.added reuses an output_index")
            added[ev["output_index"]] = ev["item"]
        elif kind == "response.output_item.done":
            i = ev.get("output_index")
            expect(i in added and i not in done, "output_item.done for an item never added")
            need(ev, {"item.type": added[i]["type"], "item.id": added[i].get("id")}, kind)
            done[i] = ev["item"]
        elif kind in ENDS:
            need(ev, {"response.id": str, "response.status": str, "response.output": list}, kind)
            last = ev
    expect(last.get("type") in ENDS, "the stream ends without response.completed")
    expect(len(done) == len(added), "an output item is never done")
    return [done[i] for i in sorted(done)], last


def _usage(response: dict) -> None:
    need(response, {"usage.input_tokens": int, "usage.output_tokens": int,
                    "usage.total_tokens": int,
                    "usage.input_tokens_details.cached_tokens": int}, "response.usage")  # fmt: skip


def codex_agent(ctx: Ctx) -> None:
    items, last = _stream(ctx, _body(ctx, ASK, tool_choice="required", max_output_tokens=CALL))
    need(last, {"type": "response.completed"}, "the last event")
    _usage(last["response"])
    calls = [i for i in items if i["type"] == "function_call"]
    expect(calls, "no function_call item although tool_choice forced one")
    for call in calls:
        need(call, {"call_id": str, "name": "get_weather", "arguments": str}, "a function_call")
        try:
            args = json.loads(call["arguments"])
        except ValueError:
            args = None
        expect(isinstance(args, dict), f"arguments are not a JSON object: {short(args)}")


def codex_tool_result(ctx: Ctx) -> None:
    """The next turn: the call and its output sent back as items."""
    items, last = _stream(ctx, _body(ctx, ROUND, max_output_tokens=SHORT))
    need(last, {"type": {"response.completed", "response.incomplete"}}, "the last event")
    _usage(last["response"])
    for item in items:
        if item["type"] == "message":
            need(item, {"role": "assistant", "content": list}, "a message item")


CHECKS = [
    Check("agent", "POST /v1/responses stream, input items, function tools, "
          "tool_choice=required", codex_agent, "tools"),
    Check("tool result", "POST /v1/responses stream, function_call + function_call_output",
          codex_tool_result, "tools"),
]  # fmt: skip


def snippet(v1: str, model: str, context: int, keyed: bool) -> tuple[str, list[str]]:
    """~/.codex/config.toml: a provider on the Responses wire API."""
    lines = [
        f"model = {json.dumps(model)}", 'model_provider = "mlxrun"',
        f"model_context_window = {context}",
        'web_search = "disabled"  # a hosted tool: Codex would send it, the server refuses it',
        "", "[model_providers.mlxrun]", 'name = "mlxrun"',
        f"base_url = {json.dumps(v1)}", 'wire_api = "responses"',
    ]  # fmt: skip
    if keyed:
        lines.append('env_key = "MLXRUN_API_KEY"')
    return "~/.codex/config.toml; then `codex` or `codex exec PROMPT`", lines
