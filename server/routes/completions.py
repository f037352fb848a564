"""POST /v1/completions: text or token-id prompts (several at once), echo, legacy logprobs, n,
streaming, and fill-in-the-middle through `suffix` on models with FIM tokens; and the FIM request
streaming, and fill-in-the-middle through `suffix` on models with FIM tokens (the other two FIM dialects
are in fim.py; the grouping all three share is server/fim_groups.py).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from mlxrun.engine import TokenLogprob

from ..common import (
    SYSTEM_FINGERPRINT,
    choice_params,
    collect,
    fit_context,
    in_thread,
    now,
    sse_stream,
    start_generation,
    usage,
)
from ..dialogue import format_constraint
from ..errors import guarded, invalid
from ..extras import note, reports
from ..fim_groups import NO_GROUP, Ticket, released, start_fim
from ..generation import ChoiceSpec, Generation
from ..protocol import CompletionRequest, parse_completion
from ..sse import EventStreamResponse
from ..state import ServerState, server_state


def _encode(state: ServerState, req: CompletionRequest) -> list[list[int]]:
    """Token ids per prompt; token-id prompts are checked against the vocabulary."""
    tokenizer = state.tokenizer
    vocab = tokenizer.vocab_size
    out = []
    for i, prompt in enumerate(req.prompts):
        where = "prompt" if len(req.prompts) == 1 else f"prompt[{i}]"
        if isinstance(prompt, str):
            if req.suffix is not None:
                ids = tokenizer.build_fim_prompt(prompt, req.suffix)
            else:
                ids = tokenizer.encode(prompt)
        else:
            if req.suffix is not None:
                raise invalid("'suffix' needs a text prompt, not token ids.", "suffix")
            bad = next((t for t in prompt if not 0 <= t < vocab), None)
            if bad is not None:
                raise invalid(
                    f"Token id {bad} in '{where}' is outside the vocabulary (0..{vocab - 1}).",
                    where,
                )
            ids = list(prompt)
        if not ids:
            raise invalid(f"'{where}' is empty: it has no tokens.", where)
        out.append(ids)
    return out


@guarded
@reports
async def create(request: Request) -> Response:
    arrival = time.perf_counter()
    state = server_state(request)
    req = parse_completion(await state.read_json(request), strict=state.config.strict)
    note(request, req.ignored)
    model = state.check_model(req.model)
    state.check_ready()
    if req.echo and req.logprobs is not None:
        raise invalid(
            "'echo' together with 'logprobs' (log probabilities of the prompt) is not supported "
            "yet.",
            "echo",
            code="unsupported_parameter",
        )
    prompts = await in_thread(_encode, state, req)
    constraint = await in_thread(format_constraint, state, req.output)
    specs = []
    for i, ids in enumerate(prompts):
        where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
        params = fit_context(state, len(ids), req.params, req.max_tokens_param, where)
        specs += [
            ChoiceSpec(
                ids,
                choice_params(params, j),
                params.stop,
                constraint=None if constraint is None else constraint.copy(),
            )
            for j in range(req.n)
        ]
    echoes = [_echo_text(state, req, p) for p in req.prompts for _ in range(req.n)]
    request_id = state.next_id("cmpl")
    gen, ticket = _start(state, request, req, specs, request_id, arrival)
    head = {"id": request_id, "object": "text_completion", "created": now(), "model": model}
    if req.stream:
        chunks = _chunks(state, req, gen, head, echoes)
        closing = lambda: _usage_chunk(req, gen, head)  # noqa: E731
        return EventStreamResponse(released(sse_stream(gen, chunks, closing), ticket))
    try:
        results = await collect(request, gen)
    finally:
        ticket.release()
    choices = []
    for i, (text, logprobs, finish) in enumerate(results):
        choices.append(
            {
                "text": echoes[i] + text,
                "index": i,
                "logprobs": _logprobs(state, logprobs, len(echoes[i]))
                if req.logprobs is not None
                else None,
                "finish_reason": finish,
            }
        )
    return JSONResponse(
        {**head, "system_fingerprint": SYSTEM_FINGERPRINT, "choices": choices, "usage": usage(gen)}
    )


def _start(
    state: ServerState,
    request: Request,
    req: CompletionRequest,
    specs: list[ChoiceSpec],
    request_id: str,
    arrival: float,
) -> tuple[Generation, Ticket]:
    """Plain completions start as they are, FIM ones through start_fim (grouped when single)."""
    if req.suffix is None:
        return start_generation(state, specs, request_id, arrival), NO_GROUP
    prompt = req.prompts[0]
    assert isinstance(prompt, str)  # _encode refused token ids with a suffix
    cursor = (prompt, req.suffix) if len(specs) == 1 else None  # choices must not cancel each other
    return start_fim(state, request, specs, request_id, arrival, cursor)


def _echo_text(state: ServerState, req: CompletionRequest, prompt: str | list[int]) -> str:
    if not req.echo:
        return ""
    return prompt if isinstance(prompt, str) else state.tokenizer.decode(prompt)


def _logprobs(state: ServerState, items: list[TokenLogprob], offset: int) -> dict[str, Any]:
    """The legacy logprobs object: tokens, their logprobs, top alternatives, text offsets."""
    texts = state.token_texts
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for lp in items:
        text = texts.get(lp.token_id)[0]
        tokens.append(text)
        token_logprobs.append(lp.logprob)
        tops.append({texts.get(i)[0]: v for i, v in lp.top})
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": tops,
        "text_offset": offsets,
    }


async def _chunks(
    state: ServerState, req: CompletionRequest, gen: Generation, head: dict, echoes: list[str]
) -> AsyncIterator[dict[str, Any]]:
    offsets = [len(e) for e in echoes]
    for i, echo in enumerate(echoes):
        if echo:
            yield _chunk(head, req, [_choice(i, echo, None, None)])
    async for d in gen.deltas():
        logprobs = None
        if req.logprobs is not None:
            logprobs = _logprobs(state, d.logprobs, offsets[d.index])
        offsets[d.index] += len(d.text)
        yield _chunk(head, req, [_choice(d.index, d.text, logprobs, d.finish_reason)])


def _choice(index: int, text: str, logprobs: Any, finish: str | None) -> dict[str, Any]:
    return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish}


def _chunk(head: dict, req: CompletionRequest, choices: list[dict]) -> dict[str, Any]:
    chunk = {**head, "system_fingerprint": SYSTEM_FINGERPRINT, "choices": choices}
    if req.include_usage:
        chunk["usage"] = None
    return chunk


def _usage_chunk(req: CompletionRequest, gen: Generation, head: dict) -> list[dict[str, Any]]:
    if not req.include_usage:
        return []
    return [{**_chunk(head, req, []), "usage": usage(gen)}]
