"""The Ollama API: clients that only speak Ollama (its CLI's API, the `ollama` libraries, editors)
work unchanged against `mlxrun serve`. This module has /api/chat and /api/generate; request parsing
is in server/protocol_ollama.py, model listing in ollama_models.py.

Chat goes through the shared pipeline (server/dialogue.py); /api/generate renders the chat template
too, unless `raw` (the prompt as is) or `suffix` (a fill-in-the-middle prompt from the model's FIM
tokens). Responses stream as NDJSON by default (`stream` defaults to true, as in Ollama); tool
calls are sent whole, arguments as an object. Errors are `{"error": "..."}` with the HTTP status.

Requests with `suffix` are autocomplete: they run at interactive priority with stale-request
cancellation, as the other FIM dialects (the group rule is in completions.py). A superseded request
ends cleanly with the text it had: done true, done_reason "stop" (on the final NDJSON line when
streamed). Ollama itself only ever sends "stop" or "length" on a generation, and typed clients map
anything else to "unknown" or reject it; "length" would claim num_predict was reached.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mlxrun.errors import InvalidRequestError

from ..common import chat_logprobs, fit_context, in_thread, start_generation, until_disconnect
from ..dialogue import ChatPlan, MessageDelta, format_constraint, message_deltas, plan_chat
from ..errors import from_mlxrun, ollama_errors, to_api_error
from ..extras import note, reports
from ..fim_groups import NO_GROUP, Ticket, released, start_fim
from ..generation import ChoiceSpec, Generation
from ..protocol_ollama import (
    MAX_PARAM,
    OllamaGenerate,
    OllamaRequest,
    parse_chat,
    parse_generate,
    rfc3339,
    served_model,
)
from ..sse import EventStreamResponse
from ..state import ServerState, server_state

READY_WAIT_S = 600  # how long a request waits for the model to load
R = TypeVar("R", bound=OllamaRequest)


class NDJSONResponse(EventStreamResponse):
    """One JSON object per line; the client leaving cancels and closes the stream at once."""

    media_type = "application/x-ndjson"


def _line(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"


def _ns(seconds: float) -> int:
    return max(1, int(seconds * 1e9))  # clients divide by these


async def _accept(
    request: Request, parse: Callable[[Mapping[str, Any], int, bool], R]
) -> tuple[ServerState, str, R]:
    """(state, model name as sent, parsed body) once the model is ready; Ollama holds requests
    while the model loads, and so do we."""
    state = server_state(request)
    body = await state.read_json(request)
    name = body.get("model")
    served_model(state.config.model_ids, name)
    req = parse(body, state.config.context_length, state.config.strict)
    note(request, req.ignored)
    deadline = time.monotonic() + READY_WAIT_S
    while not state.ready and state.load_error is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    state.check_ready()
    return state, name, req


# ---------------------------------------------------------------- output


class _Turn:
    """One choice's deltas as Ollama pieces: text as it comes, each tool call once it is whole."""

    def __init__(self, state: ServerState, arrival: float):
        self.state, self.arrival = state, arrival
        self.first: float | None = None
        self.calls: dict[int, list] = {}
        self.done_reason = "stop"

    def feed(self, d: MessageDelta) -> tuple[str, str, list[dict], list[dict]]:
        if self.first is None and d:
            self.first = time.perf_counter()
        ready: list[dict] = []
        for c in d.tool_calls:
            if c.index not in self.calls:
                ready += self._flush()  # calls come one after another
                self.calls[c.index] = [c.id, c.name, []]
            entry = self.calls[c.index]
            entry[0], entry[1] = entry[0] or c.id, entry[1] or c.name
            entry[2].append(c.arguments)
        if d.finish_reason is not None:
            ready += self._flush()
            self.done_reason = "length" if d.finish_reason == "length" else "stop"
        return d.content, d.reasoning, ready, self._logprobs(d.logprobs)

    def _flush(self) -> list[dict]:
        out = []
        for index, (call_id, name, parts) in sorted(self.calls.items()):
            text = "".join(parts)
            try:
                arguments = json.loads(text) if text.strip() else {}
            except ValueError:
                arguments = None
            if not isinstance(arguments, dict):
                continue  # a call cut short (num_predict): its text stays in the content
            function = {"index": index, "name": name or "", "arguments": arguments}
            out.append({"id": call_id or f"call_{index}", "function": function})
        self.calls.clear()
        return out

    def _logprobs(self, items: list) -> list[dict]:
        return chat_logprobs(self.state.token_texts, items)["content"] if items else []

    def stats(self, gen: Generation) -> dict[str, Any]:
        end = time.perf_counter()
        first = self.first or end
        return {
            "total_duration": _ns(end - self.arrival),
            "load_duration": 0,
            "prompt_eval_count": gen.prompt_tokens,
            "prompt_eval_duration": _ns(first - self.arrival),
            "eval_count": gen.completion_tokens,
            "eval_duration": _ns(end - first),
        }


async def _deltas(gen: Generation, plan: ChatPlan | None) -> AsyncIterator[MessageDelta]:
    if plan is not None:
        async for d in message_deltas(gen, plan):
            yield d
        return
    async for d in gen.deltas():  # raw and FIM prompts: plain text
        yield MessageDelta(d.index, d.text, logprobs=d.logprobs, finish_reason=d.finish_reason)


def _frame(name: str, chat: bool, text: str, thinking: str, calls: list, logprobs: list) -> dict:
    body: dict[str, Any] = {"content" if chat else "response": text}
    if thinking:
        body["thinking"] = thinking
    if calls:
        body["tool_calls"] = calls
    head: dict[str, Any] = {"model": name, "created_at": rfc3339()}
    frame = {**head, "message": {"role": "assistant", **body}} if chat else {**head, **body}
    if logprobs:
        frame["logprobs"] = logprobs
    return {**frame, "done": False}


async def _frames(
    state: ServerState, name: str, chat: bool, gen: Generation, plan: ChatPlan | None
) -> AsyncIterator[dict[str, Any]]:
    turn = _Turn(state, gen.arrival)
    async for d in _deltas(gen, plan):
        text, thinking, calls, logprobs = turn.feed(d)
        if text or thinking or calls or logprobs:
            yield _frame(name, chat, text, thinking, calls, logprobs)
    last = _frame(name, chat, "", "", [], [])
    yield {**last, "done": True, "done_reason": turn.done_reason, **turn.stats(gen)}


async def _stream(gen: Generation, frames: AsyncIterator[dict]) -> AsyncIterator[bytes]:
    try:
        async for frame in frames:
            yield _line(frame)
    except Exception as e:  # noqa: BLE001 - the status is sent: the error travels in the stream
        yield _line({"error": to_api_error(e).message})
    finally:
        await gen.aclose()
        gen.record_usage()


async def _collect(gen: Generation, frames: AsyncIterator[dict], chat: bool) -> dict[str, Any]:
    """The frames merged into one response, as Ollama answers with stream: false."""
    key = "content" if chat else "response"
    parts: dict[str, list] = {key: [], "thinking": [], "tool_calls": [], "logprobs": []}
    last: dict[str, Any] = {}
    try:
        async for frame in frames:
            body = frame["message"] if chat else frame
            for field, items in parts.items():
                value = frame.get(field) if field == "logprobs" else body.get(field)
                if value:
                    items.extend([value] if isinstance(value, str) else value)
            last = frame
    finally:
        await gen.aclose()
        gen.record_usage()
    merged: dict[str, Any] = {key: "".join(parts[key])}
    if parts["thinking"]:
        merged["thinking"] = "".join(parts["thinking"])
    if parts["tool_calls"]:
        merged["tool_calls"] = parts["tool_calls"]
    out = {**last, "message": {"role": "assistant", **merged}} if chat else {**last, **merged}
    if parts["logprobs"]:
        out["logprobs"] = parts["logprobs"]
    return out


async def _respond(
    request: Request,
    req: OllamaRequest,
    name: str,
    gen: Generation,
    plan: ChatPlan | None,
    chat: bool,
    ticket: Ticket = NO_GROUP,
) -> Response:
    """The generation as NDJSON lines or one merged object; `ticket` (its FIM group) is released
    when the response ends or the client leaves."""
    frames = _frames(server_state(request), name, chat, gen, plan)
    if req.stream:
        return NDJSONResponse(released(_stream(gen, frames), ticket))
    try:
        return JSONResponse(await until_disconnect(request, _collect(gen, frames, chat)))
    finally:
        ticket.release()


def _loaded(name: str, chat: bool, unload: bool) -> JSONResponse:
    """Ollama's answer to a call with nothing to generate: the model is (already) loaded. With
    keep_alive 0 it asks for an unload; this server keeps its one model for its lifetime."""
    body = {"role": "assistant", "content": ""}
    text = {"message": body} if chat else {"response": ""}
    reason = "unload" if unload else "load"
    return JSONResponse(
        {"model": name, "created_at": rfc3339(), **text, "done": True, "done_reason": reason}
    )


# ---------------------------------------------------------------- /api/chat, /api/generate


@ollama_errors
@reports
async def chat(request: Request) -> Response:
    arrival = time.perf_counter()
    state, name, req = await _accept(request, parse_chat)
    if not req.messages:
        return _loaded(name, True, req.unload)
    plan = await in_thread(
        plan_chat, state, req.messages, req.params, tools=req.tools, choice=req.tool_choice,
        output=req.output, max_param=MAX_PARAM, template_kwargs=req.template_kwargs,
    )  # fmt: skip
    gen = start_generation(state, plan.specs, state.next_id("ollama-chat"), arrival)
    return await _respond(request, req, name, gen, plan, chat=True)


def _plain_spec(state: ServerState, req: OllamaGenerate) -> ChoiceSpec:
    """A raw or fill-in-the-middle prompt: no chat template. Blocking (tokenizer, grammar)."""
    tokenizer = state.tokenizer
    try:
        if req.suffix:
            ids = tokenizer.build_fim_prompt(req.prompt, req.suffix)
        else:
            ids = tokenizer.encode(req.prompt)
        constraint = format_constraint(state, req.output)
    except InvalidRequestError as e:
        raise from_mlxrun(e) from None
    params = fit_context(state, len(ids), req.params, MAX_PARAM, "prompt")
    return ChoiceSpec(ids, params, params.stop, constraint=constraint)


@ollama_errors
@reports
async def generate(request: Request) -> Response:
    arrival = time.perf_counter()
    state, name, req = await _accept(request, parse_generate)
    if not req.prompt and not req.suffix:
        return _loaded(name, False, req.unload)
    if req.raw or req.suffix:
        spec = await in_thread(_plain_spec, state, req)
        request_id = state.next_id("ollama-gen")
        if req.suffix:  # autocomplete: a newer request at the same cursor supersedes this one
            cursor = (req.prompt, req.suffix)
            gen, ticket = start_fim(state, request, [spec], request_id, arrival, cursor)
        else:
            gen, ticket = start_generation(state, [spec], request_id, arrival), NO_GROUP
        return await _respond(request, req, name, gen, None, chat=False, ticket=ticket)
    messages = [{"role": "system", "content": req.system}] if req.system else []
    messages.append({"role": "user", "content": req.prompt})
    plan = await in_thread(
        plan_chat, state, messages, req.params, output=req.output, max_param=MAX_PARAM,
        template_kwargs=req.template_kwargs,
    )  # fmt: skip
    gen = start_generation(state, plan.specs, state.next_id("ollama-gen"), arrival)
    return await _respond(request, req, name, gen, plan, chat=False)


routes: list[Route] = [
    Route("/api/chat", chat, methods=["POST"]),
    Route("/api/generate", generate, methods=["POST"]),
]
