"""Fill-in-the-middle for editors, in the three dialects they speak.

- POST /v1/fim/completions (Mistral/Codestral; Continue): {model, prompt, suffix, max_tokens,
  temperature, top_p, stop, stream, random_seed, ...} -> a "chat.completion" whose
  choices[0].message.content is the middle; streamed as "chat.completion.chunk" deltas + [DONE].
- POST /infill (llama.cpp server; llama.vim, llama.vscode): input_prefix, input_suffix, input_extra
  [{filename, text}], prompt (typed after the prefix), n_predict and llama.cpp's sampling options
  -> {content, stop, stop_type, tokens_predicted, timings, ...}; streamed as `data: {...}` events,
  the last with stop: true and no [DONE] (as llama.cpp).
- POST /v1/completions with `suffix` (OpenAI) is in completions.py; it starts through start_fim.

The prompt is Tokenizer.build_fim_prompt(prefix, suffix), the model's own FIM tokens; a model
without them gets a 400. /infill puts input_extra between BOS and the FIM prefix, in llama.cpp's
repo-level layout when the vocab has a file separator
(`<repo_name>myproject\\n<file_sep>{filename}\\n{text}...<file_sep>filename\\n`), else each chunk
after a "--- snippet ---" line; what does not fit beside the prompt and n_predict is cut from its
oldest end.

Both run at interactive priority with stale-request cancellation (the rule is in completions.py).
A cancelled request ends cleanly with its text so far: Mistral's finish_reason "error" (its clients
know only stop/length/model_length/error/tool_calls), llama.cpp's stop: true, stop_type "none".
Both bodies are parsed in server/protocol_fim.py.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .. import common
from ..errors import guarded, invalid
from ..extras import note, reports
from ..fim_groups import released, start_fim
from ..generation import ChoiceSpec, Generation
from ..protocol_fim import Infill, parse_infill, parse_mistral
from ..sse import DONE, EventStreamResponse
from ..state import ServerState, server_state

_SNIPPET = "\n\n--- snippet ---\n\n"  # llama.cpp's chunk separator without a file-separator token


# ---------------------------------------------------------------- shared parsing


def _require_fim(state: ServerState, param: str) -> None:
    if state.tokenizer.fim_tokens is None:
        raise invalid(
            "This model has no fill-in-the-middle tokens, so it cannot complete between a "
            "prefix and a suffix. Use a code model trained for FIM (Qwen2.5-Coder, StarCoder2, "
            "CodeLlama).",
            param,
            code="fim_not_supported",
        )


# ---------------------------------------------------------------- Mistral: /v1/fim/completions

_MISTRAL_FINISH = {"abort": "error"}  # Mistral's clients know no "abort"


@guarded
@reports
async def mistral_fim(request: Request) -> Response:
    arrival = time.perf_counter()
    state = server_state(request)
    req = parse_mistral(await state.read_json(request), state.config.strict)
    note(request, req.ignored)
    model = state.check_model(req.model)
    state.check_ready()
    _require_fim(state, "suffix")
    ids = await common.in_thread(state.tokenizer.build_fim_prompt, req.prompt, req.suffix)
    params = common.fit_context(state, len(ids), req.params, req.max_param, "prompt")
    request_id = state.next_id("fim")
    spec = ChoiceSpec(ids, params, params.stop)
    gen, ticket = start_fim(state, request, [spec], request_id, arrival, (req.prompt, req.suffix))
    head = {"id": request_id, "created": common.now(), "model": model}
    if req.stream:
        stream = common.sse_stream(gen, _mistral_chunks(gen, head), lambda: [])
        return EventStreamResponse(released(stream, ticket))
    try:
        ((text, _, finish),) = await common.collect(request, gen)
    finally:
        ticket.release()
    message = {"role": "assistant", "content": text, "tool_calls": None, "prefix": False}
    choice = {"index": 0, "message": message, "finish_reason": _MISTRAL_FINISH.get(finish, finish)}
    body = {**head, "object": "chat.completion", "choices": [choice], "usage": common.usage(gen)}
    return JSONResponse(body)


async def _mistral_chunks(gen: Generation, head: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return {**head, "object": "chat.completion.chunk", "choices": [choice]}

    yield chunk({"role": "assistant", "content": ""})
    async for d in gen.deltas():
        if d.finish_reason is None:
            yield chunk({"content": d.text})
        else:  # Mistral puts usage on the chunk that finishes
            finish = _MISTRAL_FINISH.get(d.finish_reason, d.finish_reason)
            yield {**chunk({"content": d.text}, finish), "usage": common.usage(gen)}


# ---------------------------------------------------------------- llama.cpp: /infill


def infill_prompt(
    tokenizer: Any, prefix: str, suffix: str, extra: Sequence[tuple[str, str]], budget: int
) -> list[int]:
    """[BOS] extra-context PRE prefix SUF suffix MID in at most `budget` tokens, cutting only the
    extra context (from its oldest end); the FIM part itself is never cut here."""
    ids = tokenizer.build_fim_prompt(prefix, suffix)
    room = budget - len(ids)
    if not extra or room <= 0:
        return ids
    fim = tokenizer.fim_tokens

    def enc(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False) if text else []

    sep, context = fim.file_sep_id, []
    if fim.repo_name_id is not None:
        context += [fim.repo_name_id, *enc("myproject\n")]
    for filename, text in extra:
        context += ([sep, *enc(filename + "\n")] if sep is not None else enc(_SNIPPET)) + enc(text)
    if sep is not None:
        context += [sep, *enc("filename\n")]  # the current file, unnamed (as llama.cpp)
    at = ids.index(fim.prefix_id)
    return ids[:at] + context[-room:] + ids[at:]


class _InfillRun:
    """One /infill generation: its text, stop cause and timings; applies t_max_predict_ms."""

    def __init__(self, gen: Generation, req: Infill, arrival: float):
        self.gen, self.req, self.arrival = gen, req, arrival
        self.warmup = req.n_predict == 0
        self.parts: list[str] = []
        self.first: float | None = None
        self.end: float | None = None
        self.finish, self.timed_out, self.new_line = "abort", False, False

    async def pieces(self) -> AsyncIterator[str]:
        async for d in self.gen.deltas():
            at = time.perf_counter()
            if self.first is None and self.gen.completion_tokens:
                self.first = at
            if d.text and not self.warmup:
                self.parts.append(d.text)
                self.new_line = self.new_line or "\n" in d.text
                yield d.text
            if d.finish_reason is not None:
                self.finish = d.finish_reason
            elif self._over_time(at):
                self.timed_out = True
                break
        self.end = time.perf_counter()
        if self.timed_out:
            await self.gen.aclose()

    def _over_time(self, at: float) -> bool:
        # llama.cpp's rule: past the limit since the first token, once a line has been written.
        limit, first = self.req.time_limit_s, self.first
        return bool(limit and first is not None and at - first > limit and self.new_line)

    def _stop_type(self) -> tuple[str, str]:
        if self.timed_out or self.finish == "length":
            return "limit", ""
        if self.finish == "stop":
            word = self.gen.choices[0].output.matched_stop
            return ("word", word) if word else ("eos", "")
        return "none", ""  # cancelled: superseded or stopped

    def _timings(self) -> dict[str, Any]:
        gen, end = self.gen, self.end or time.perf_counter()
        first = self.first or end
        out: dict[str, Any] = {"cache_n": gen.cached_tokens}
        for name, n, ms in (
            ("prompt", gen.prompt_tokens - gen.cached_tokens, (first - self.arrival) * 1000),
            ("predicted", self.predicted, (end - first) * 1000),
        ):
            out[f"{name}_n"], out[f"{name}_ms"] = n, ms
            out[f"{name}_per_token_ms"] = ms / n if n else 0.0
            out[f"{name}_per_second"] = n * 1000 / ms if n and ms > 0 else 0.0
        return out

    @property
    def predicted(self) -> int:
        return 0 if self.warmup else self.gen.completion_tokens

    def partial(self, text: str) -> dict[str, Any]:
        return {
            "index": 0,
            "content": text,
            "tokens": [],
            "stop": False,
            "id_slot": 0,
            "tokens_predicted": self.predicted,
            "tokens_evaluated": self.gen.prompt_tokens,
        }

    def final(self, state: ServerState, content: str) -> dict[str, Any]:
        stop_type, word = self._stop_type()
        config, fields = state.config, self.req.fields
        body = {
            **self.partial(content),
            "stop": True,
            "model": config.model_id,
            "generation_settings": {
                "n_ctx": config.context_length,
                "model": config.model_id,
                **self.req.settings,
            },
            "has_new_line": self.new_line,
            "truncated": False,
            "stop_type": stop_type,
            "stopping_word": word,
            "tokens_cached": self.gen.cached_tokens,
            "timings": self._timings(),
        }
        if fields is None or "prompt" in fields:
            body["prompt"] = state.tokenizer.decode(self.gen.choices[0].spec.prompt_ids)
        return body if not fields else _select(body, fields)


def _select(body: dict[str, Any], fields: list[str]) -> dict[str, Any]:
    """llama.cpp's response_fields: only these, "a/b" lifted to the top under its path."""
    out = {}
    for path in fields:
        value: Any = body
        for part in path.split("/"):
            if not isinstance(value, dict) or part not in value:
                break
            value = value[part]
        else:
            out[path] = value
    return out


@guarded
@reports
async def infill(request: Request) -> Response:
    arrival = time.perf_counter()
    state = server_state(request)
    body = await state.read_json(request)
    req = parse_infill(body, state.config.context_length, state.config.strict)
    note(request, req.ignored)
    state.check_ready()
    _require_fim(state, "input_suffix")
    cursor = (req.prefix, req.suffix)
    ids = await common.in_thread(
        infill_prompt, state.tokenizer, *cursor, req.extra, _budget(state, req)
    )
    params = common.fit_context(state, len(ids), req.params, "n_predict", "input_prefix")
    spec, rid = ChoiceSpec(ids, params, params.stop), state.next_id("infill")
    if req.n_predict == 0:  # a warm-up is background work: no group, no priority
        gen, ticket = start_fim(state, request, [spec], rid, arrival, None, priority=0)
    else:
        gen, ticket = start_fim(state, request, [spec], rid, arrival, cursor)
    run = _InfillRun(gen, req, arrival)
    if req.stream:
        stream = common.sse_stream(gen, _infill_chunks(state, run), lambda: [])
        return EventStreamResponse(released(stream, ticket, skip=DONE))

    async def work() -> None:
        try:
            async for _ in run.pieces():
                pass
        finally:
            await gen.aclose()
            gen.record_usage()

    try:
        await common.until_disconnect(request, work())
    finally:
        ticket.release()
    return JSONResponse(run.final(state, "".join(run.parts)))


def _budget(state: ServerState, req: Infill) -> int:
    """Prompt tokens allowed, extra context included: the context less the output reserved."""
    limit, cap = state.config.context_length, state.config.max_output_tokens
    reserve = req.params.max_tokens
    if reserve is None:
        reserve = limit // 4 if cap is None else min(cap, limit // 4)
    return limit - reserve


async def _infill_chunks(state: ServerState, run: _InfillRun) -> AsyncIterator[dict[str, Any]]:
    async for text in run.pieces():
        yield run.partial(text)
    yield run.final(state, "")  # the text went out in the partial events


routes: list[Route] = [
    Route("/v1/fim/completions", mistral_fim, methods=["POST"]),
    Route("/infill", infill, methods=["POST"]),
]
