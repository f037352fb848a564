"""What chat and completions share: context fitting, choice seeds, token texts, running a
generation to the end or until the client leaves, and SSE streaming of a generation."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import anyio
from starlette.requests import Request

from mlxrun import __version__
from mlxrun.budget import output_budget
from mlxrun.engine import TokenLogprob
from mlxrun.errors import MlxrunError
from mlxrun.sampling import SamplingParams

from . import access, errors
from .errors import APIError, to_api_error
from .generation import ChoiceSpec, Generation
from .sse import DONE, event
from .state import ServerState
from .tokens import TokenTexts

T = TypeVar("T")
log = logging.getLogger("mlxrun.server")

SYSTEM_FINGERPRINT = f"fp_mlxrun_{__version__}"


def fit_context(
    state: ServerState,
    prompt_tokens: int,
    params: SamplingParams,
    max_param: str,
    prompt_param: str,
    default: int | None = None,
) -> SamplingParams:
    """params with max_tokens granted by the budget rule (mlxrun.budget): a prompt that does not
    fit is a 400; a max_tokens past what is left is clamped (reported in the request's record,
    hence a response header and the access log), or a 400 under --strict on OpenAI's routes.
    `default` stands in for an unset max_tokens (still bounded by the context)."""
    record = access.current()
    config = state.config
    try:
        budget = output_budget(
            prompt_tokens,
            params.max_tokens,
            config.context_length,
            default=default,
            cap=config.max_output_tokens,
            strict=config.strict and record.dialect == access.OPENAI,
            param=max_param,
            prompt_param=prompt_param,
        )
    except MlxrunError as e:
        raise errors.from_mlxrun(e) from None
    if budget.clamped:
        record.clamp = budget.describe()
        log.debug("%s: %s %s clamped to what fits", record.id, max_param, budget.describe())
    return params.replace(max_tokens=budget.granted)


def choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """Choice i draws with seed + i, so n > 1 with a seed gives n different, reproducible choices."""
    if index == 0 or params.seed is None:
        return params
    return params.replace(seed=params.seed + index)


async def in_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Tokenizing and template rendering off the event loop (long prompts take a while)."""
    return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


def start_generation(
    state: ServerState, specs: list[ChoiceSpec], request_id: str, arrival: float
) -> Generation:
    gen = Generation(state.engine, state.tokenizer, specs, request_id, state.metrics, arrival)
    gen.start()  # overload and engine-side validation raise here, before any response
    return gen


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`; if the client goes away first, cancel it (its cleanup aborts the engine
    requests) and raise a 499 nobody will read (nginx's "client closed request")."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    try:
        return await task
    except asyncio.CancelledError:
        if watcher.cancelled() or not watcher.done():
            raise  # we were cancelled ourselves (server shutdown)
        raise APIError(499, "The client closed the request.", code="client_closed") from None


async def collect(request: Request, gen: Generation) -> list[tuple[str, list, str]]:
    async def run() -> list[tuple[str, list, str]]:
        try:
            return await gen.collect()
        finally:
            await gen.aclose()
            gen.record_usage()

    return await until_disconnect(request, run())


async def sse_stream(
    gen: Generation, chunks: AsyncIterator[Any], closing: Callable[[], list[Any]]
) -> AsyncIterator[bytes]:
    """Frames `chunks` as SSE; after them, closing() (e.g. the usage chunk) and [DONE]. An error
    mid-stream is sent as an error object (OpenAI's clients raise it), then the stream ends."""
    try:
        async for chunk in chunks:
            yield event(chunk)
        for chunk in closing():
            yield event(chunk)
        yield DONE
    except Exception as e:  # noqa: BLE001 - headers are sent: the error travels in the stream
        yield event(to_api_error(e).body())
    finally:
        await gen.aclose()
        gen.record_usage()


def usage(gen: Generation) -> dict[str, Any]:
    prompt, completion = gen.prompt_tokens, gen.completion_tokens
    details: dict[str, int] = {"cached_tokens": gen.cached_tokens}  # prefix and reused chunks
    if gen.reused_chunk_tokens:  # mlxrun's own field, only when --cache-reuse reused some
        details["reused_chunk_tokens"] = gen.reused_chunk_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": details,
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "accepted_prediction_tokens": gen.prediction_tokens[0],
            "rejected_prediction_tokens": gen.prediction_tokens[1],
        },
    }


def now() -> int:
    return int(time.time())


def chat_logprobs(texts: TokenTexts, items: list[TokenLogprob]) -> dict[str, Any]:
    """OpenAI's chat logprobs object for some tokens."""

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text, raw = texts.get(token_id)
        return {"token": text, "logprob": logprob, "bytes": raw}

    content = [
        {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(i, v) for i, v in lp.top]}
        for lp in items
    ]
    return {"content": content, "refusal": None}
