"""POST /v1/chat/completions: messages -> chat template -> n choices, as JSON or SSE chunks."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..errors import guarded
from ..generation import ChoiceSpec, Generation
from ..protocol import ChatRequest, parse_chat
from ..sse import EventStreamResponse
from ..state import ServerState, server_state
from .common import (
    SYSTEM_FINGERPRINT,
    chat_logprobs,
    choice_params,
    collect,
    fit_context,
    in_thread,
    now,
    sse_stream,
    start_generation,
    usage,
)


@guarded
async def create(request: Request) -> Response:
    arrival = time.perf_counter()
    state = server_state(request)
    req = parse_chat(await state.read_json(request))
    model = state.check_model(req.model)
    state.check_ready()
    tokenizer = state.tokenizer
    prompt_ids = await in_thread(tokenizer.apply_chat_template, req.messages)
    params = fit_context(state, len(prompt_ids), req.params, req.max_tokens_param, "messages")
    stops = (*params.stop, *tokenizer.chat_stop_strings)
    specs = [ChoiceSpec(prompt_ids, choice_params(params, i), stops) for i in range(req.n)]
    request_id = state.next_id("chatcmpl")
    gen = start_generation(state, specs, request_id, arrival)
    head = {"id": request_id, "created": now(), "model": model}
    if req.stream:
        chunks = _chunks(state, req, gen, head)
        closing = lambda: _usage_chunk(req, gen, head)  # noqa: E731
        return EventStreamResponse(sse_stream(gen, chunks, closing))
    results = await collect(request, gen)
    choices = []
    for i, (text, logprobs, finish) in enumerate(results):
        choices.append(
            {
                "index": i,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": chat_logprobs(state.token_texts, logprobs)
                if req.params.logprobs
                else None,
                "finish_reason": finish,
            }
        )
    body = {
        **head,
        "object": "chat.completion",
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": choices,
        "usage": usage(gen),
    }
    return JSONResponse(body)


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
    state: ServerState, req: ChatRequest, gen: Generation, head: dict
) -> AsyncIterator[dict[str, Any]]:
    """The role first (one chunk per choice), then content deltas; finish_reason on the last."""
    for i in range(req.n):
        delta = {"role": "assistant", "content": ""}
        yield _chunk(
            head, req, [{"index": i, "delta": delta, "logprobs": None, "finish_reason": None}]
        )
    async for d in gen.deltas():
        choice: dict[str, Any] = {
            "index": d.index,
            "delta": {},
            "logprobs": None,
            "finish_reason": None,
        }
        if d.text or d.logprobs:
            choice["delta"] = {"content": d.text}
        if req.params.logprobs and d.logprobs:
            choice["logprobs"] = chat_logprobs(state.token_texts, d.logprobs)
        if d.finish_reason is not None and choice["delta"]:
            # Content and the finish reason travel apart: the last chunk has an empty delta.
            yield _chunk(head, req, [choice])
            choice = {"index": d.index, "delta": {}, "logprobs": None, "finish_reason": None}
        choice["finish_reason"] = d.finish_reason
        yield _chunk(head, req, [choice])


def _usage_chunk(req: ChatRequest, gen: Generation, head: dict) -> list[dict[str, Any]]:
    if not req.include_usage:
        return []
    return [{**_chunk(head, req, []), "usage": usage(gen)}]
