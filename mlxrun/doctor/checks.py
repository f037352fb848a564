"""The checks of `mlxrun doctor`, one list per client: each check is one request shaped like that
client's own (streaming where it streams) plus assertions on what that client parses. Content is
never judged (a small model may write anything), so tool calls are forced with tool_choice.
Checks that exercise tools or fill-in-the-middle say so (`needs`): on a model that lacks them the
server's clean refusal is reported as "unsupported", not as a failure.
"""

from __future__ import annotations

import json
from typing import Any

from mlxrun.doctor import codex as doctor_codex
from mlxrun.doctor.probe import (
    NONE,
    Check,
    Client,
    Ctx,
    Failure,
    Lacks,
    Skip,
    at,
    expect,
    need,
    parse,
    request_json,
    short,
    sse_events,
)

CITIES = ["Paris", "Tokyo", "Lima"]  # an enum keeps a forced call short on any model
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": CITIES}},
    "required": ["city"],
    "additionalProperties": False,
}
ABOUT = "Current weather in a city."
OPENAI_TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": ABOUT, "parameters": WEATHER}}]  # fmt: skip
ANTHROPIC_TOOLS = [{"name": "get_weather", "description": ABOUT, "input_schema": WEATHER}]
ANTHROPIC_HEADERS = {  # as Claude Code sends them; a server must ignore betas it does not know
    "anthropic-version": "2023-06-01",
    "anthropic-beta": "claude-code-20250219,fine-grained-tool-streaming-2025-05-14",
}
SYSTEM, ASK = "You are a coding assistant.", "What is the weather in Paris?"
PREFIX, SUFFIX = "def add(a, b):\n    ", "\n\nprint(add(1, 2))\n"
SHORT = 16  # max tokens for plain answers
CALL = 100  # max tokens for one forced call, in any template's wrapping
USAGE = {"include_usage": True}
FINISH = {"stop", "length", "tool_calls", "content_filter"}
STOP_REASONS = {"end_turn", "max_tokens", "stop_sequence", "tool_use", "pause_turn", "refusal",
                "model_context_window_exceeded"}  # fmt: skip
BLOCK_DELTAS = {"text": {"text_delta"}, "tool_use": {"input_json_delta"},
                "thinking": {"thinking_delta", "signature_delta"},
                "redacted_thinking": set()}  # fmt: skip
EVENTS = {  # what the Anthropic SDK reads from each event Claude Code acts on
    "message_start": {"message.type": "message", "message.role": "assistant", "message.id": str,
                      "message.content": list, "message.usage.input_tokens": int},
    "content_block_start": {"index": int, "content_block.type": set(BLOCK_DELTAS)},
    "content_block_delta": {"index": int, "delta.type": str},
    "content_block_stop": {"index": int},
    "message_delta": {"delta.stop_reason": STOP_REASONS, "usage.output_tokens": int},
    "message_stop": {},
}  # fmt: skip
NO_KEY = "Copilot's Ollama provider sends no API key: use the Custom Endpoint entry below"

# ---------------------------------------------------------------- OpenAI shapes


def _openai_stream(ctx: Ctx, path: str, body: dict, obj: str | None) -> list[dict]:
    events = sse_events(ctx, path, body)
    expect(events[-1][1] == "[DONE]", "the stream does not end with data: [DONE]")
    chunks = [parse(data) for _, data in events[:-1]]
    for chunk in chunks:
        expect(at(chunk, "error") is None, f"error in the stream: {short(at(chunk, 'error'))}")
        need(chunk, {"choices": list, **({"object": obj} if obj else {})}, "a chunk")
        for choice in chunk["choices"]:
            need(choice, {"index": 0}, "a choice")
    return chunks


def _usage(usage: Any, details: bool = False) -> None:
    spec = {"prompt_tokens": int, "completion_tokens": int, "total_tokens": int}
    if details:  # Copilot reads the cached count
        spec["prompt_tokens_details.cached_tokens"] = int
    need(usage, spec, "usage")
    total = usage["prompt_tokens"] + usage["completion_tokens"]
    expect(usage["total_tokens"] == total, "usage.total_tokens is not prompt + completion tokens")


def _arguments(args: Any) -> None:
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            raise Failure(f"the call's arguments are not valid JSON: {short(args)}") from None
    valid = isinstance(args, dict) and set(args) == {"city"} and args["city"] in CITIES
    expect(valid, f"the call's arguments do not match the tool's schema: {short(args)}")


def _tool_delta(calls: dict[int, str], d: Any) -> None:
    need(d, {"index": int, "function.arguments": (str, NONE)}, "a tool_calls delta")
    if d["index"] not in calls:
        spec = {"id": str, "type": "function", "function.name": "get_weather"}
        need(d, spec, "a call's first delta")
        calls[d["index"]] = ""
    else:  # clients append name fragments: a repeated name would come out doubled
        expect(not at(d, "function.name"), "function.name is repeated on a later delta")
    calls[d["index"]] += at(d, "function.arguments") or ""


def _chat_stream(ctx: Ctx, body: dict, forced: bool = False, details: bool = False) -> None:
    chunks = _openai_stream(ctx, "/v1/chat/completions", body, "chat.completion.chunk")
    calls: dict[int, str] = {}
    finish = usage = None
    for chunk in chunks:
        expect(usage is None, "a chunk follows the usage chunk")
        if chunk.get("usage") is not None:
            expect(not chunk["choices"], "the usage chunk's choices are not empty")
            usage = chunk["usage"]
        for choice in chunk["choices"]:
            expect(finish is None, "a chunk follows the one with finish_reason")
            need(choice, {"delta": dict, "delta.content": (str, NONE)}, "a chunk")
            for d in choice["delta"].get("tool_calls") or ():
                _tool_delta(calls, d)
            finish = choice.get("finish_reason")
    need({"finish_reason": finish}, {"finish_reason": FINISH}, "the last chunk")
    if at(body, "stream_options.include_usage"):
        expect(usage is not None, "no usage chunk although stream_options.include_usage asked")
        _usage(usage, details)
    if forced:
        expect(calls, "no tool call although tool_choice forced one")
        expect(finish == "tool_calls", f"finish_reason is {finish!r}, want 'tool_calls'")
        for args in calls.values():
            _arguments(args)


def _chat_once(ctx: Ctx, body: dict) -> None:
    reply = request_json(ctx, "POST", "/v1/chat/completions", body)
    need(reply, {"object": "chat.completion", "choices.0.message.role": "assistant",
                 "choices.0.message.content": str, "choices.0.finish_reason": FINISH})  # fmt: skip
    _usage(at(reply, "usage"))


def _chat(ctx: Ctx, **kw: Any) -> dict:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": ASK}]
    return {"model": ctx.model, "messages": messages, "temperature": 0, "stream": True, **kw}


def _forced(ctx: Ctx, limit: str = "max_tokens", **kw: Any) -> dict:
    """One forced call (parallel_tool_calls false, as Zed and Continue send): it must end."""
    return _chat(ctx, tools=OPENAI_TOOLS, tool_choice="required", parallel_tool_calls=False,
                 **{limit: CALL}, **kw)  # fmt: skip


def _fim(ctx: Ctx, path: str, delta: bool) -> None:
    """/v1/completions answers `text`; /v1/fim/completions chat-style `delta.content` (what
    Continue reads)."""
    body = {"model": ctx.model, "prompt": PREFIX, "suffix": SUFFIX, "max_tokens": SHORT,
            "temperature": 0.01, "stop": ["\n\n\n"], "stream": True}  # fmt: skip
    finish = None
    for chunk in _openai_stream(ctx, path, body, None if delta else "text_completion"):
        for choice in chunk["choices"]:
            spec = {"delta": dict, "delta.content": (str, NONE)} if delta else {"text": str}
            need(choice, spec, "a chunk")
            finish = choice.get("finish_reason") or finish
    need({"finish_reason": finish}, {"finish_reason": FINISH}, "the last chunk")


def models_list(ctx: Ctx) -> None:
    models = request_json(ctx, "GET", "/v1/models")
    need(models, {"data": list})
    ids = [at(m, "id") for m in models["data"]]
    expect(ctx.model in ids, f"{ctx.model!r} is not among data[].id {ids}")


TOOL_CALL = {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}  # fmt: skip
TOOL_TURN = [{"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
             {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"}]  # fmt: skip


def zed_tool_result(ctx: Ctx) -> None:
    body = _chat(ctx, tools=OPENAI_TOOLS, max_completion_tokens=SHORT, stream_options=USAGE)
    _chat_stream(ctx, {**body, "messages": body["messages"] + TOOL_TURN})


# ---------------------------------------------------------------- Anthropic shapes


def _anthropic_stream(ctx: Ctx, body: dict) -> tuple[list[dict], Any]:
    """Checks the event sequence; returns the content blocks with their streamed JSON, and the
    stop_reason."""
    blocks: dict[int, dict] = {}
    kinds: list[str] = []
    stop = None
    for name, data in sse_events(ctx, "/v1/messages?beta=true", body, ANTHROPIC_HEADERS):
        ev = parse(data)
        kind = at(ev, "type")
        expect(kind != "error", f"error event: {short(at(ev, 'error'))}")
        expect(name == kind, f"an event's `event:` line says {name!r}, its data {kind!r}")
        if kind not in EVENTS:
            continue  # ping, and event types added later: clients skip them
        need(ev, EVENTS[kind], kind)
        expect((kind == "message_start") == (not kinds), "message_start does not come first")
        expect("message_stop" not in kinds, f"{kind} follows message_stop")
        kinds.append(kind)
        i = ev.get("index")
        if kind == "content_block_start":
            expect(i not in blocks, "content_block_start reuses an index")
            blocks[i] = block = {**ev["content_block"], "json": "", "open": True}
            if block["type"] == "tool_use":
                need(block, {"id": str, "name": "get_weather", "input": dict}, "a tool_use block")
        elif kind in ("content_block_delta", "content_block_stop"):
            expect(i in blocks and blocks[i]["open"], f"{kind} for a block that is not open")
            blocks[i]["open"] = kind == "content_block_delta"
            need(ev, {"delta.type": BLOCK_DELTAS[blocks[i]["type"]]} if blocks[i]["open"] else {},
                 f"a delta in a {blocks[i]['type']} block")  # fmt: skip
            if at(ev, "delta.type") == "input_json_delta":
                need(ev, {"delta.partial_json": str}, kind)
                blocks[i]["json"] += ev["delta"]["partial_json"]
        elif kind == "message_delta":
            stop = ev["delta"]["stop_reason"]
    expect(kinds[-1:] == ["message_stop"], "the stream does not end with message_stop")
    expect(not any(b["open"] for b in blocks.values()), "a content block is never stopped")
    expect(stop is not None, "no message_delta carries the stop_reason")
    return [blocks[i] for i in sorted(blocks)], stop


CACHED = {"type": "ephemeral"}
ONE_CALL = {"type": "any", "disable_parallel_tool_use": True}
ASK_BLOCKS = [{"role": "user", "content": [{"type": "text", "text": ASK, "cache_control": CACHED}]}]
TOOL_ROUND = [*ASK_BLOCKS, {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1",
    "name": "get_weather", "input": {"city": "Paris"}}]}, {"role": "user", "content": [
    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18 C, sunny"}]}]  # fmt: skip


def _claude(ctx: Ctx, messages: list[dict], **kw: Any) -> dict:
    system = [{"type": "text", "text": SYSTEM, "cache_control": CACHED}]
    return {"model": ctx.model, "system": system, "messages": messages, "tools": ANTHROPIC_TOOLS,
            **kw}  # fmt: skip


def claude_count(ctx: Ctx) -> None:
    body = _claude(ctx, ASK_BLOCKS)
    reply = request_json(
        ctx, "POST", "/v1/messages/count_tokens?beta=true", body, ANTHROPIC_HEADERS
    )
    need(reply, {"input_tokens": int})
    expect(reply["input_tokens"] > 0, "input_tokens is 0")


def claude_agent(ctx: Ctx) -> None:
    body = _claude(ctx, ASK_BLOCKS, max_tokens=CALL, stream=True, tool_choice=ONE_CALL,
                   metadata={"user_id": "mlxrun-doctor"}, temperature=0)  # fmt: skip
    blocks, stop = _anthropic_stream(ctx, body)
    calls = [b for b in blocks if b["type"] == "tool_use"]
    expect(calls, "no tool_use block although tool_choice forced one")
    expect(stop == "tool_use", f"stop_reason is {stop!r}, want 'tool_use'")
    for b in calls:
        _arguments(b["json"] or b["input"])


def claude_tool_result(ctx: Ctx) -> None:
    body = _claude(ctx, TOOL_ROUND, max_tokens=SHORT, temperature=0)
    reply = request_json(ctx, "POST", "/v1/messages?beta=true", body, ANTHROPIC_HEADERS)
    need(reply, {"type": "message", "role": "assistant", "content": list,
                 "stop_reason": STOP_REASONS, "usage.input_tokens": int,
                 "usage.output_tokens": int})  # fmt: skip
    for block in reply["content"]:
        need(block, {"type": set(BLOCK_DELTAS)}, "a content block")
        need(block, {"text": str} if block["type"] == "text" else {}, "a text block")


# ---------------------------------------------------------------- Ollama shapes (Copilot)


def _ollama(ctx: Ctx, method: str, path: str, body: Any = None) -> Any:
    if ctx.api_key:
        raise Skip(NO_KEY)
    return request_json(ctx, method, path, body, auth=False)


def copilot_version(ctx: Ctx) -> None:
    reply = _ollama(ctx, "GET", "/api/version")
    need(reply, {"version": str})
    parts = reply["version"].split("-")[0].split(".")
    new = all(p.isdigit() for p in parts) and tuple(map(int, parts)) >= (0, 6, 4)
    expect(new, f"version {reply['version']!r} is not 0.6.4 or later, which Copilot requires")


def copilot_tags(ctx: Ctx) -> None:
    reply = _ollama(ctx, "GET", "/api/tags")
    need(reply, {"models": list})
    names = [at(m, "model") for m in reply["models"]]
    ctx.found["tag"] = next((n for n in names if n in (ctx.model, f"{ctx.model}:latest")), None)
    expect(ctx.found["tag"], f"{ctx.model!r} is not among models[].model {names}")


def copilot_show(ctx: Ctx) -> None:
    info = _ollama(ctx, "POST", "/api/show", {"model": ctx.found.get("tag") or ctx.model})
    need(info, {"capabilities": list, "model_info.general.architecture": str})
    arch = at(info, "model_info.general.architecture")
    need(info, {f"model_info.{arch}.context_length": int})
    if "tools" not in info["capabilities"]:
        raise Lacks("tools", "capabilities lack 'tools' (Copilot's agent mode needs it)")


def copilot_chat(ctx: Ctx) -> None:
    body = _forced(ctx, model=ctx.found.get("tag") or ctx.model, top_p=1, n=1, stream_options=USAGE)
    _chat_stream(ctx, body, forced=True, details=True)


def openai_chat(ctx: Ctx) -> None:
    _chat_stream(ctx, _chat(ctx, max_tokens=SHORT, stream_options=USAGE))


def openai_agent(ctx: Ctx) -> None:
    _chat_stream(ctx, _forced(ctx, stream_options=USAGE), forced=True)


CHAT = "POST /v1/chat/completions stream"
FORCED = "include_usage, tools, tool_choice=required"


def _openai_client(agent: str) -> list[Check]:
    """What Continue and Cline both send; they name the forced-call check differently."""
    return [
        Check("model list", "GET /v1/models", models_list),
        Check("chat", f"{CHAT}, include_usage", openai_chat),
        Check(agent, f"{CHAT}, {FORCED}", openai_agent, "tools"),
    ]


CLIENTS: dict[str, Client] = {
    "continue": ("Continue", [
        *_openai_client("agent"),
        Check("autocomplete", "POST /v1/completions stream, prompt + suffix",
              lambda c: _fim(c, "/v1/completions", delta=False), "fim"),
        Check("autocomplete (FIM API)", "POST /v1/fim/completions stream, prompt + suffix",
              lambda c: _fim(c, "/v1/fim/completions", delta=True), "fim"),
    ]),
    "zed": ("Zed", [
        Check("agent", f"{CHAT}, {FORCED}", lambda c: _chat_stream(
            c, _forced(c, "max_completion_tokens", stream_options=USAGE), forced=True), "tools"),
        Check("tool result", f"{CHAT}, include_usage, assistant tool_calls + role tool",
              zed_tool_result, "tools"),
    ]),
    "aider": ("Aider", [
        Check("chat", f"{CHAT}, no tools", lambda c: _chat_stream(c, _chat(c, max_tokens=SHORT))),
        Check("commit message", "POST /v1/chat/completions",
              lambda c: _chat_once(c, _chat(c, max_tokens=SHORT, stream=False))),
    ]),
    "cline": ("Cline", _openai_client("native tools")),
    "claude-code": ("Claude Code", [
        Check("count tokens", "POST /v1/messages/count_tokens, system + tools", claude_count),
        Check("agent", "POST /v1/messages stream, cache_control, tools, tool_choice=any",
              claude_agent, "tools"),
        Check("tool result", "POST /v1/messages, tool_use + tool_result", claude_tool_result,
              "tools"),
    ]),
    "copilot": ("GitHub Copilot (BYOK)", [
        Check("Ollama version", "GET /api/version", copilot_version),
        Check("Ollama models", "GET /api/tags", copilot_tags),
        Check("Ollama model info", "POST /api/show", copilot_show),
        Check("agent", f"{CHAT}, {FORCED}", copilot_chat, "tools"),
    ]),
    "codex": ("Codex CLI", doctor_codex.CHECKS),
}  # fmt: skip
