"""OpenAI's Responses API over the shared chat pipeline (server/dialogue.py): POST /v1/responses,
GET / DELETE /v1/responses/{id}, GET .../input_items and POST .../cancel.

State: a stored response (`store`, the default) keeps its input items and its output, so a request
with previous_response_id renders that whole conversation plus its own input. The prompt then
starts with the earlier one token for token, and the prefix cache serves it (pinned while it is
recent, Request.pin_prefix): only the new input is prefilled, as usage.input_tokens_details
.cached_tokens shows. Streams are OpenAI's typed events (`event:` + `data:` with sequence
numbers); a client that leaves aborts the engine requests, and so does cancelling a background
response.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .. import auth
from ..common import in_thread, start_generation, until_disconnect
from ..dialogue import ChatPlan, MessageDelta, message_deltas, plan_chat
from ..errors import APIError, guarded, invalid, to_api_error
from ..extras import note, reports
from ..generation import Generation
from ..models_pool import use_model
from ..protocol_responses import ResponsesRequest, new_id, parse_responses, to_messages
from ..responses_output import OutputItems
from ..responses_store import StoredResponse, valid_id
from ..sse import EventStreamResponse
from ..state import ServerState, server_state

MAX_LIST = 100


def _not_found(response_id: str, param: str | None = None) -> APIError:
    what = "Previous response" if param else "Response"
    return APIError(404, f"{what} with id '{response_id}' not found.", param=param,
                    code="previous_response_not_found" if param else "not_found")  # fmt: skip


def _stored(
    state: ServerState, response_id: str, owner: str, param: str | None = None
) -> StoredResponse:
    """The record, if it exists and belongs to `owner` (another key's is a plain 404)."""
    record = state.responses.get(response_id) if valid_id(response_id) else None
    if record is None or record.owner != owner:
        raise _not_found(response_id, param)
    return record


@dataclasses.dataclass
class _Run:
    """One response under way: its request, generation, items and what it continues."""

    state: ServerState
    req: ResponsesRequest
    gen: Generation
    plan: ChatPlan
    id: str
    context: list[dict[str, Any]]  # the input items the prompt was rendered from
    created_at: int
    owner: str  # server.auth.owner of the creating request
    finish: str = "stop"
    items: OutputItems = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.items = OutputItems(self.req.namespaces)

    def usage(self) -> dict[str, Any]:
        gen, reasoning = self.gen, self.items.reasoning_text
        thought = len(self.state.tokenizer.encode(reasoning, add_special_tokens=False))
        return {
            "input_tokens": gen.prompt_tokens,
            "input_tokens_details": {"cached_tokens": gen.cached_tokens, "cache_write_tokens": 0},
            "output_tokens": gen.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": thought if reasoning else 0},
            "total_tokens": gen.prompt_tokens + gen.completion_tokens,
        }

    def response(self, status: str, error: APIError | None = None) -> dict[str, Any]:
        done = status not in ("queued", "in_progress")
        if status == "failed" and error is None:  # aborted by the engine (shutting down)
            error = APIError(503, "The generation was aborted by the server.")
        echo = dict(self.req.echo)
        echo["reasoning"] = echo["reasoning"] or {"effort": None, "summary": None}
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "error": None if error is None else
            {"code": "server_error" if error.status >= 500 else "invalid_prompt",
             "message": error.message},
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete"
            else None,
            "model": self.req.model, "output": [dict(i) for i in self.items.items] if done else [],
            "previous_response_id": self.req.previous_response_id,
            "usage": self.usage() if done else None,
            "completed_at": int(time.time()) if status == "completed" else None,
            **echo,
        }  # fmt: skip

    @property
    def status(self) -> str:
        if self.finish == "length":
            return "incomplete"
        if self.finish == "abort":
            return "cancelled" if self.req.background else "failed"
        return "completed"

    def save(self, body: dict[str, Any]) -> dict[str, Any]:
        if self.req.store:
            self.state.responses.put(StoredResponse(body, self.context, owner=self.owner))
        return body


async def _deltas(run: _Run) -> AsyncIterator[MessageDelta]:
    async for d in message_deltas(run.gen, run.plan):
        if d.finish_reason is not None:
            run.finish = d.finish_reason
        yield d


async def _collect(run: _Run) -> dict[str, Any]:
    try:
        async for d in _deltas(run):
            run.items.push(d)
        run.items.finish(run.finish == "length")
    finally:
        await run.gen.aclose()
        run.gen.record_usage()
    return run.save(run.response(run.status))


def _frame(event: dict[str, Any]) -> bytes:
    text = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
    return f"event: {event['type']}\ndata: {text}\n\n".encode()


async def _stream(run: _Run) -> AsyncIterator[bytes]:
    """created, in_progress, the items' events, then completed / incomplete (or failed: the
    headers are sent, so an error travels in the stream)."""
    numbers = itertools.count()

    def frame(event: dict[str, Any]) -> bytes:
        return _frame({**event, "sequence_number": next(numbers)})

    try:
        yield frame({"type": "response.created", "response": run.response("in_progress")})
        yield frame({"type": "response.in_progress", "response": run.response("in_progress")})
        async for d in _deltas(run):
            for e in run.items.push(d):
                yield frame(e)
        for e in run.items.finish(run.finish == "length"):
            yield frame(e)
        body = run.save(run.response(run.status))
        yield frame({"type": f"response.{body['status']}", "response": body})
    except Exception as e:  # noqa: BLE001 - reported as response.failed
        body = run.save(run.response("failed", to_api_error(e)))
        yield frame({"type": "response.failed", "response": body})
    finally:
        await run.gen.aclose()
        run.gen.record_usage()


async def _background(run: _Run) -> None:
    try:
        await _collect(run)
    except asyncio.CancelledError:
        run.save(run.response("cancelled"))  # POST .../cancel: the generation is aborted
    except Exception as e:  # noqa: BLE001 - the failure is what GET will show
        run.save(run.response("failed", to_api_error(e)))
    finally:
        run.state.responses.running.pop(run.id, None)


def _context(state: ServerState, req: ResponsesRequest, owner: str) -> list[dict[str, Any]]:
    """The items the prompt is rendered from: the previous response's input and output, then
    this request's input."""
    if req.previous_response_id is None:
        return req.items
    prev = _stored(state, req.previous_response_id, owner, "previous_response_id")
    output = [i for i in prev.response.get("output", []) if isinstance(i, dict)]
    return [*prev.input_items, *output, *req.items]


def _plan(
    state: ServerState, req: ResponsesRequest, messages: list[dict], scope: str | None
) -> ChatPlan:
    plan = plan_chat(state, messages, req.params, tools=req.tools, choice=req.choice,
                     output=req.output, max_param="max_output_tokens",
                     template_kwargs=req.template_kwargs)  # fmt: skip
    # Pinned when stored: the next turn's prompt starts with this one; in the key's own scope.
    pin = len(plan.prompt_ids) if req.store else 0
    specs = [dataclasses.replace(s, pin_prefix=pin, namespace=scope) for s in plan.specs]
    return dataclasses.replace(plan, specs=specs)


@guarded
@reports
async def create(request: Request) -> Response:
    arrival = time.perf_counter()
    state = server_state(request)
    req = parse_responses(await state.read_json(request), strict=state.config.strict)
    note(request, list(req.ignored))
    state = await use_model(request, req.model)
    owner = auth.owner(request)
    context = _context(state, req, owner)
    messages = to_messages(req.instructions, context)
    plan = await in_thread(_plan, state, req, messages, auth.cache_scope(request))
    response_id = new_id("resp")
    gen = start_generation(state, plan.specs, response_id, arrival)
    run = _Run(state, req, gen, plan, response_id, context, int(time.time()), owner)
    if req.background:
        body = run.save(run.response("in_progress"))
        state.responses.running[response_id] = asyncio.ensure_future(_background(run))
        return JSONResponse(body)
    if req.stream:
        return EventStreamResponse(_stream(run))
    return JSONResponse(await until_disconnect(request, _collect(run)))


@guarded
async def retrieve(request: Request) -> Response:
    state = server_state(request)
    return JSONResponse(
        _stored(state, request.path_params["response_id"], auth.owner(request)).response
    )


@guarded
async def delete(request: Request) -> Response:
    state = server_state(request)
    response_id = request.path_params["response_id"]
    _stored(state, response_id, auth.owner(request))
    task = state.responses.running.get(response_id)
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    state.responses.delete(response_id)
    return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})


@guarded
async def cancel(request: Request) -> Response:
    state = server_state(request)
    response_id = request.path_params["response_id"]
    if not _stored(state, response_id, auth.owner(request)).response.get("background"):
        raise invalid("Only responses created with background true can be cancelled.")
    task = state.responses.running.get(response_id)
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return JSONResponse(_stored(state, response_id, auth.owner(request)).response)


@guarded
async def input_items(request: Request) -> Response:
    state = server_state(request)
    items = list(
        _stored(state, request.path_params["response_id"], auth.owner(request)).input_items
    )
    query = dict(request.query_params)
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise invalid("Invalid value for 'order': expected 'asc' or 'desc'.", "order")
    try:
        limit = int(query.get("limit", 20))
    except ValueError:
        raise invalid("'limit' must be an integer.", "limit") from None
    if not 1 <= limit <= MAX_LIST:
        raise invalid(f"'limit' must be between 1 and {MAX_LIST}.", "limit")
    if order == "desc":
        items.reverse()
    ids = [i["id"] for i in items]
    start = ids.index(query["after"]) + 1 if query.get("after") in ids else 0
    page = items[start : start + limit]
    return JSONResponse({
        "object": "list", "data": page, "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None, "has_more": start + limit < len(items),
    })  # fmt: skip


routes: list[Route] = [
    Route("/v1/responses", create, methods=["POST"]),
    Route("/v1/responses/{response_id}", retrieve, methods=["GET"]),
    Route("/v1/responses/{response_id}", delete, methods=["DELETE"]),
    Route("/v1/responses/{response_id}/cancel", cancel, methods=["POST"]),
    Route("/v1/responses/{response_id}/input_items", input_items, methods=["GET"]),
]
