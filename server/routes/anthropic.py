"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API over the shared chat
pipeline (server/dialogue.py), so Claude Code and other Anthropic clients work unchanged.

Requests become neutral messages (tool_use blocks -> assistant tool calls, tool_result blocks ->
"tool" messages), tools and a ToolChoice (server/protocol_anthropic.py); the output becomes
content blocks (thinking, text, tool_use) sent whole or as Anthropic's SSE events. Errors leave in
Anthropic's shape. The last cache_control mark's prefix is measured in tokens: usage reports it as
cache read (what the prefix cache held) plus cache creation, the rest as input_tokens, and it is
pinned in the prefix cache (Request.pin_prefix).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mlxrun.errors import InvalidRequestError
from mlxrun.parsing.tools import ToolCallDelta

from .. import auth, errors
from ..access import ANTHROPIC
from ..common import in_thread, start_generation, until_disconnect
from ..dialogue import ChatPlan, MessageDelta, message_deltas, plan_chat
from ..errors import APIError, from_mlxrun, guarded, invalid, to_api_error
from ..extras import note, reports
from ..generation import Generation
from ..protocol_anthropic import MessagesRequest, parse_messages
from ..sse import EventStreamResponse
from ..state import ServerState, server_state

T = TypeVar("T")
PING_S = 10.0  # a ping event after this long without output


# ---------------------------------------------------------------- errors


def error_response(exc: BaseException) -> JSONResponse:
    return errors.dialect_response(exc, ANTHROPIC)


def anthropic_errors(
    handler: Callable[[Request], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    """Like errors.guarded, in Anthropic's error shape."""
    return guarded(handler, error_response)


# ---------------------------------------------------------------- prompts


def render(state: ServerState, req: MessagesRequest) -> list[int]:
    """The prompt ids exactly as plan_chat renders them."""
    try:
        return state.tokenizer.apply_chat_template(
            req.messages, tools=req.render_tools, **req.template_kwargs
        )
    except InvalidRequestError as e:
        raise from_mlxrun(e) from None


def marked_tokens(state: ServerState, req: MessagesRequest, prompt_ids: list[int]) -> int:
    """Prompt tokens up to the last cache_control mark: the conversation rendered as far as the
    mark, compared with the prompt (a lower bound where a template renders a turn differently
    when it is the last one)."""
    if not req.marked:
        return 0
    kwargs = {k: v for k, v in req.template_kwargs.items() if k != "continue_final_message"}
    try:
        ids = state.tokenizer.apply_chat_template(
            req.marked, tools=req.render_tools, add_generation_prompt=False, **kwargs
        )
    except InvalidRequestError:
        return 0
    n = 0
    for a, b in zip(ids, prompt_ids, strict=False):
        if a != b:
            break
        n += 1
    return n


def _too_long(state: ServerState, req: MessagesRequest) -> APIError:
    """Anthropic's wording: Claude Code compacts its conversation when it reads it."""
    limit = state.config.context_length
    return invalid(f"prompt is too long: {len(render(state, req))} tokens > {limit} maximum",
                   "messages")  # fmt: skip


# ---------------------------------------------------------------- responses


class Blocks:
    """Message deltas -> content blocks, and the stream events that build them (non-streamed
    responses are built from the same events, so both carry the same blocks). Whitespace-only
    text between blocks is dropped."""

    def __init__(self, show_thinking: bool = True):
        self.show_thinking = show_thinking
        self.blocks: list[dict[str, Any]] = []
        self._open: str | None = None  # type of the open block
        self._calls: dict[int, int] = {}  # tool-call index -> its block's index
        self._args: dict[int, list[str]] = {}  # block index -> input JSON fragments
        self._pending = ""

    def push(self, d: MessageDelta) -> list[dict[str, Any]]:
        events = []
        if d.reasoning and self.show_thinking:
            if self._open != "thinking":
                events += self._start({"type": "thinking", "thinking": "", "signature": ""})
            events.append(self._delta({"type": "thinking_delta", "thinking": d.reasoning}))
        if d.content:
            events += self._text(d.content)
        for call in d.tool_calls:
            events += self._tool(call)
        return events

    def finish(self) -> list[dict[str, Any]]:
        events = []
        if not self.blocks and self._pending:  # nothing else was said: keep the whitespace
            events += self._start({"type": "text", "text": ""})
            events.append(self._delta({"type": "text_delta", "text": self._pending}))
        events += self._close()
        for i, parts in self._args.items():
            try:
                value = json.loads("".join(parts) or "{}")
            except ValueError:  # cut off by max_tokens
                value = {}
            self.blocks[i]["input"] = value if isinstance(value, dict) else {}
        return events

    def _text(self, text: str) -> list[dict[str, Any]]:
        events = []
        if self._open != "text":
            text, self._pending = self._pending + text, ""
            if not text.strip():
                self._pending = text
                return []
            events += self._start({"type": "text", "text": ""})
        return [*events, self._delta({"type": "text_delta", "text": text})]

    def _tool(self, call: ToolCallDelta) -> list[dict[str, Any]]:
        events = []
        if call.index not in self._calls:
            if call.name is None:  # the rest of a call that broke off: its block is closed
                return []
            call_id = "toolu_" + (call.id or f"call_{call.index}").removeprefix("call_")
            events += self._start({"type": "tool_use", "id": call_id, "name": call.name,
                                   "input": {}})  # fmt: skip
            self._calls[call.index] = len(self.blocks) - 1
            self._args[len(self.blocks) - 1] = []
        index = self._calls[call.index]
        if self._open != "tool_use" or index != len(self.blocks) - 1:
            return events  # fragments after its block closed (text came between)
        if call.arguments:
            self._args[index].append(call.arguments)
            events.append(self._delta({"type": "input_json_delta", "partial_json": call.arguments}))
        return events

    def _start(self, block: dict[str, Any]) -> list[dict[str, Any]]:
        events = self._close()
        self.blocks.append(dict(block))
        self._open = block["type"]
        index = len(self.blocks) - 1
        return [*events, {"type": "content_block_start", "index": index, "content_block": block}]

    def _delta(self, delta: dict[str, Any]) -> dict[str, Any]:
        block = self.blocks[-1]
        for key in ("text", "thinking"):
            if key in delta:
                block[key] += delta[key]
        return {"type": "content_block_delta", "index": len(self.blocks) - 1, "delta": delta}

    def _close(self) -> list[dict[str, Any]]:
        if self._open is None:
            return []
        self._open = None
        return [{"type": "content_block_stop", "index": len(self.blocks) - 1}]


@dataclass
class _Run:
    """One /v1/messages call under way: what its usage and stop_reason are computed from."""

    req: MessagesRequest
    gen: Generation
    head: dict[str, Any]
    marked: int  # prompt tokens up to the last cache mark
    window_clipped: bool  # max_tokens was cut to what the context leaves
    finish: str = "stop"

    def usage(self) -> dict[str, int]:
        """Anthropic's accounting, once the prefix cache was looked up: up to the last cache
        mark, tokens read from the cache and tokens written to it; after it, input_tokens. The
        three sum to the prompt. With no mark, the prefix cache's own hit counts as read."""
        prompt, cached = self.gen.prompt_tokens, self.gen.cached_tokens
        boundary = self.marked or cached
        read = min(cached, boundary)
        created = boundary - read
        return {
            "input_tokens": prompt - boundary,
            "cache_creation_input_tokens": created,
            "cache_read_input_tokens": read,
            "output_tokens": self.gen.completion_tokens if self.req.max_tokens else 0,
        }

    def stop(self) -> dict[str, Any]:
        if self.finish == "tool_calls":
            return {"stop_reason": "tool_use", "stop_sequence": None}
        if self.finish == "length" or not self.req.max_tokens:
            limit = "model_context_window_exceeded" if self.window_clipped else "max_tokens"
            return {"stop_reason": limit, "stop_sequence": None}
        matched = self.gen.matched_stop(0)
        if matched is not None and matched in self.req.params.stop:
            return {"stop_reason": "stop_sequence", "stop_sequence": matched}
        return {"stop_reason": "end_turn", "stop_sequence": None}

    def message(self, content: list[dict[str, Any]], done: bool) -> dict[str, Any]:
        stop = self.stop() if done else {"stop_reason": None, "stop_sequence": None}
        return {**self.head, "content": content, **stop, "usage": self.usage()}


async def _deltas(run: _Run, plan: ChatPlan) -> AsyncGenerator[MessageDelta, None]:
    async for d in message_deltas(run.gen, plan):
        if d.finish_reason is not None:
            run.finish = d.finish_reason
        if run.req.max_tokens:  # max_tokens 0 only warms the prefix cache
            yield d


async def _collect(request: Request, run: _Run, plan: ChatPlan) -> dict[str, Any]:
    async def work() -> dict[str, Any]:
        blocks = Blocks(run.req.show_thinking)
        try:
            async for d in _deltas(run, plan):
                blocks.push(d)
            blocks.finish()
        finally:
            await run.gen.aclose()
            run.gen.record_usage()
        return run.message(blocks.blocks, done=True)

    return await until_disconnect(request, work())


def _event(data: dict[str, Any]) -> bytes:
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"event: {data['type']}\ndata: {text}\n\n".encode()


async def _pinging(items: AsyncGenerator[T, None], every: float) -> AsyncGenerator[T | None, None]:
    """`items`, with None whenever `every` seconds pass without one (a long prefill), so that
    proxies and clients see the stream alive."""
    pending = asyncio.ensure_future(anext(items))
    try:
        while True:
            done, _ = await asyncio.wait({pending}, timeout=every)
            if not done:
                yield None
                continue
            try:
                item = pending.result()
            except StopAsyncIteration:
                return
            yield item
            pending = asyncio.ensure_future(anext(items))
    finally:
        pending.cancel()
        await asyncio.gather(pending, return_exceptions=True)
        await items.aclose()


async def _stream(run: _Run, plan: ChatPlan) -> AsyncIterator[bytes]:
    """message_start (once the prefix cache was looked up), the blocks' events (pings while
    nothing comes), message_delta with the same usage and the output count, message_stop; an
    error after the headers is an `error` event."""
    blocks = Blocks(run.req.show_thinking)
    deltas = _pinging(_deltas(run, plan), PING_S)
    started = False
    try:
        async for d in deltas:
            # message_start waits for the prefix-cache lookup, so that its usage is the final
            # one; pings keep the stream alive meanwhile (the SDKs skip them).
            if not started and (d is not None or run.gen.looked_up):
                started = True
                yield _event({"type": "message_start", "message": run.message([], done=False)})
            for e in [{"type": "ping"}] if d is None else blocks.push(d):
                yield _event(e)
        if not started:
            yield _event({"type": "message_start", "message": run.message([], done=False)})
        for e in blocks.finish():
            yield _event(e)
        yield _event({"type": "message_delta", "delta": run.stop(), "usage": run.usage()})
        yield _event({"type": "message_stop"})
    except Exception as e:  # noqa: BLE001 - headers are sent: the error travels in the stream
        yield _event(errors.anthropic_body(to_api_error(e)))
    finally:
        await deltas.aclose()
        await run.gen.aclose()
        run.gen.record_usage()


def _prepare(state: ServerState, req: MessagesRequest) -> tuple[ChatPlan, int]:
    """plan_chat (blocking) plus the marked prefix; a prompt past the context in Anthropic's
    words."""
    params = req.params.replace(max_tokens=max(1, req.max_tokens))  # 0 warms the cache: 1 token
    try:
        plan = plan_chat(state, req.messages, params, tools=req.tools, choice=req.choice,
                         output=req.output, template_kwargs=req.template_kwargs)  # fmt: skip
    except APIError as e:
        if e.code == "context_length_exceeded":
            raise _too_long(state, req) from None
        raise
    return plan, marked_tokens(state, req, plan.prompt_ids)


async def _read(request: Request, counting: bool = False) -> tuple[ServerState, MessagesRequest]:
    """The server state and the parsed body, its model checked."""
    state = server_state(request)
    body = await state.read_json(request)
    req = parse_messages(body, counting=counting, strict=state.config.strict)
    note(request, req.ignored)
    state.check_model(req.model)
    return state, req


@anthropic_errors
@reports
async def create(request: Request) -> Response:
    arrival = time.perf_counter()
    state, req = await _read(request)
    state.check_ready()
    plan, marked = await in_thread(_prepare, state, req)
    scope = auth.cache_scope(request)  # every cache_control pin is the key's own
    specs = [dataclasses.replace(s, pin_prefix=marked, namespace=scope) for s in plan.specs]
    plan = dataclasses.replace(plan, specs=specs)
    request_id = state.next_id("msg").replace("-", "_", 1)
    gen = start_generation(state, plan.specs, request_id, arrival)
    head = {"id": request_id, "type": "message", "role": "assistant", "model": req.model}
    # Past the context max_tokens was cut to what is left (the budget rule), as Anthropic
    # does: a stop there reads model_context_window_exceeded.
    room = state.config.context_length - len(plan.prompt_ids)
    granted = plan.specs[0].params.max_tokens
    run = _Run(req, gen, head, marked, window_clipped=req.max_tokens > room and granted == room)
    if req.stream:
        return EventStreamResponse(_stream(run, plan))
    return JSONResponse(await _collect(request, run, plan))


@anthropic_errors
@reports
async def count_tokens(request: Request) -> Response:
    state, req = await _read(request, counting=True)
    ids = await in_thread(render, state, req)
    return JSONResponse({"input_tokens": len(ids)})


routes: list[Route] = [
    Route("/v1/messages", create, methods=["POST"]),
    Route("/v1/messages/count_tokens", count_tokens, methods=["POST"]),
]
