"""POST /v1/chat/completions: messages -> chat template -> n choices, as JSON or SSE chunks, with
tools, structured output and reasoning through the shared chat pipeline (server/dialogue.py)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..dialogue import ChatPlan, Message, collect_messages, message_deltas, plan_chat
from ..errors import guarded
from ..extras import note, reports
from ..generation import Generation
from ..protocol import ChatRequest, parse_chat
from ..sse import EventStreamResponse
from ..state import ServerState, server_state

if TYPE_CHECKING:
    from mlxrun.parsing.tools import ToolCall, ToolCallDelta
from ..common import (
    SYSTEM_FINGERPRINT,
    chat_logprobs,
    in_thread,
    now,
    sse_stream,
    start_generation,
    usage,
)


@guarded
@reports
async def create(request: Request) -> Response:
    arrival = time.perf_counter()
    state = server_state(request)
    req = parse_chat(await state.read_json(request), strict=state.config.strict)
    note(request, req.ignored)
    model = state.check_model(req.model)
    state.check_ready()
    plan = await in_thread(
        plan_chat,
        state,
        req.messages,
        req.params,
        tools=req.tools,
        choice=req.tool_choice,
        output=req.output,
        n=req.n,
        max_param=req.max_tokens_param,
        template_kwargs=req.template_kwargs,
    )
    request_id = state.next_id("chatcmpl")
    gen = start_generation(state, plan.specs, request_id, arrival)
    head = {"id": request_id, "created": now(), "model": model}
    if req.stream:
        chunks = _chunks(state, req, gen, plan, head)
        closing = lambda: _usage_chunk(req, gen, head)  # noqa: E731
        return EventStreamResponse(sse_stream(gen, chunks, closing))
    results = await collect_messages(request, gen, plan)
    choices = [
        {
            "index": i,
            "message": _message(m),
            "logprobs": chat_logprobs(state.token_texts, m.logprobs)
            if req.params.logprobs
            else None,
            "finish_reason": m.finish_reason,
        }
        for i, m in enumerate(results)
    ]
    body = {
        **head,
        "object": "chat.completion",
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": choices,
        "usage": usage(gen),
    }
    return JSONResponse(body)


def _message(m: Message) -> dict[str, Any]:
    out: dict[str, Any] = {
        "role": "assistant",
        "content": m.content if m.content or not m.tool_calls else None,
        "refusal": None,
    }
    if m.reasoning:
        out["reasoning_content"] = m.reasoning
    if m.tool_calls:
        out["tool_calls"] = [_call(c) for c in m.tool_calls]
    return out


def _call(c: ToolCall) -> dict[str, Any]:
    return {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}


def _call_delta(d: ToolCallDelta) -> dict[str, Any]:
    out: dict[str, Any] = {"index": d.index}
    function: dict[str, Any] = {"arguments": d.arguments}
    if d.id is not None:
        out.update(id=d.id, type="function")
    if d.name is not None:
        function["name"] = d.name
    out["function"] = function
    return out


def _chunk(head: dict, req: ChatRequest, choices: list[dict[str, Any]]) -> dict[str, Any]:
    chunk = {
        **head,
        "object": "chat.completion.chunk",
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": choices,
    }
    if req.include_usage:
        chunk["usage"] = None  # only the closing chunk carries it
    return chunk


async def _chunks(
    state: ServerState, req: ChatRequest, gen: Generation, plan: ChatPlan, head: dict
) -> AsyncIterator[dict[str, Any]]:
    """The role first (one chunk per choice, content null, tools or not), then reasoning /
    content / tool-call deltas, never an empty content string; the finish_reason travels alone
    in each choice's last chunk."""
    for i in range(req.n):
        delta = {"role": "assistant", "content": None}
        yield _chunk(
            head, req, [{"index": i, "delta": delta, "logprobs": None, "finish_reason": None}]
        )
    async for d in message_deltas(gen, plan):
        if d:
            delta: dict[str, Any] = {}
            if d.reasoning:
                delta["reasoning_content"] = d.reasoning
            if d.content:
                delta["content"] = d.content
            if d.tool_calls:
                delta["tool_calls"] = [_call_delta(c) for c in d.tool_calls]
            logprobs = None
            if req.params.logprobs and d.logprobs:
                logprobs = chat_logprobs(state.token_texts, d.logprobs)
            choice = {"index": d.index, "delta": delta, "logprobs": logprobs, "finish_reason": None}
            yield _chunk(head, req, [choice])
        if d.finish_reason is not None:
            choice = {
                "index": d.index,
                "delta": {},
                "logprobs": None,
                "finish_reason": d.finish_reason,
            }
            yield _chunk(head, req, [choice])


def _usage_chunk(req: ChatRequest, gen: Generation, head: dict) -> list[dict[str, Any]]:
    if not req.include_usage:
        return []
    return [{**_chunk(head, req, []), "usage": usage(gen)}]
