"""Generation from Python and the terminal: a synchronous face over the Engine (one decode loop).

    for chunk in generate_stream(model, tokenizer, ids, SamplingParams(temperature=0)):
        print(chunk.text, end="")

    with local_engine(model, tokenizer, info.context_length) as engine:    # several requests
        for chunk in stream_request(engine, tokenizer, ids, params):
            ...

The engine decodes, applies stop tokens, EOS and the output budget (mlxrun.budget) and keeps
finished requests' KV in its prefix cache (and disk tier, when configured), so a caller that
sends a conversation again only computes its new tokens. This module adds what the server's
output stage adds: detokenizing, stop strings, timings. Closing a stream early (or Ctrl-C while
it waits) aborts the request and waits for the engine to let it go, so its KV is cached.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Generator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import mlx.core as mx

from mlxrun.engine import Engine, EngineConfig, Event, Request, TokenLogprob
from mlxrun.sampling import SamplingParams

if TYPE_CHECKING:
    from mlxrun.batch import SyncStream
    from mlxrun.constrain import Constraint
    from mlxrun.models import ModelProtocol
    from mlxrun.output import TextOutput
    from mlxrun.tokenizer import Tokenizer

_ids = itertools.count()


@dataclass(frozen=True)
class GenerationChunk:
    """One step of output. `token_id` is None on a closing chunk that carries no output token
    (an EOS or stop token, or an abort); `finish_reason` is None until the last chunk ("stop",
    "length" or "abort")."""

    text: str
    token_id: int | None
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    prefilled_tokens: int = 0  # prompt tokens computed for this request (the rest were cached)
    generation_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tps: float = 0.0
    peak_memory_gb: float = 0.0

    @property
    def cached_tokens(self) -> int:
        return self.prompt_tokens - self.prefilled_tokens


def engine_config(
    tokenizer: Tokenizer, namespace: str, context_length: int | None, **overrides: Any
) -> EngineConfig:
    """The EngineConfig of a loaded model: its EOS ids (the tokenizer's set adds the chat
    template's end-of-turn tokens to config.json's), its name as the cache namespace."""
    return EngineConfig(
        eos_token_ids=tuple(sorted(tokenizer.eos_token_ids)),
        namespace=namespace,
        context_length=context_length,
        **overrides,
    )


@contextmanager
def local_engine(
    model: ModelProtocol,
    tokenizer: Tokenizer,
    context_length: int | None = None,
    namespace: str = "local",
    **overrides: Any,
) -> Iterator[Engine]:
    """A started Engine for one caller (overrides: EngineConfig fields); shut down on exit,
    which writes the prefix cache to the disk tier when there is one."""
    from mlxrun.engine_mirror import make_engine

    config = engine_config(tokenizer, namespace, context_length, **overrides)
    engine = make_engine(model, config).start()  # mirrored across ranks under mlx.launch
    try:
        yield engine
    finally:
        engine.shutdown()


class _Timer:
    """Per-request timings, as the chunks report them."""

    def __init__(self, prompt_tokens: int):
        self.prompt_tokens = prompt_tokens
        self.cached = 0
        self.start = time.perf_counter()
        self.first: float | None = None
        self.generated = 0

    def chunk(self, text: str, token: int | None, lp: Any, finish: str | None) -> GenerationChunk:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        prompt_s, decode_s = self.first - self.start, now - self.first
        prefilled = self.prompt_tokens - self.cached
        return GenerationChunk(
            text=text,
            token_id=token,
            logprob=lp.logprob if lp is not None else None,
            top_logprobs=lp.top if lp is not None else None,
            finish_reason=finish,
            prompt_tokens=self.prompt_tokens,
            prefilled_tokens=prefilled,
            generation_tokens=self.generated,
            prompt_tps=prefilled / prompt_s if prompt_s > 0 else 0.0,
            generation_tps=(self.generated - 1) / decode_s if decode_s > 0 else 0.0,
            peak_memory_gb=mx.get_peak_memory() / 1e9,
        )


def stream_request(
    engine: Engine,
    tokenizer: Tokenizer,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    *,
    constraint: Constraint | None = None,
) -> Generator[GenerationChunk, None, None]:
    """One request on a running engine, chunk by chunk. Raises before any work for bad input
    (ContextLengthExceededError, InvalidRequestError): the request is submitted at the call."""
    ids = [int(t) for t in prompt_ids]
    mx.reset_peak_memory()
    timer = _Timer(len(ids))  # from submission: time to first token includes the queue
    request = Request(f"local-{next(_ids)}", ids, params, constraint=constraint)
    events = engine.submit_sync(request)
    return _chunks(events, tokenizer, params, timer)


def _chunks(
    events: SyncStream, tokenizer: Tokenizer, params: SamplingParams, timer: _Timer
) -> Generator[GenerationChunk, None, None]:
    from mlxrun.output import TextOutput

    out = TextOutput(tokenizer, params.stop)
    try:
        for event in events:
            timer.cached = event.cached_tokens
            yield from _event_chunks(event, timer, out)
            if out.stopped:  # a stop string completed: the engine need not go on
                return
    finally:
        if not events.finished:  # closed early, Ctrl-C, or a stop string: abort and wait
            events.abort()
            for _ in events:
                pass  # the engine's last event for it: its KV is in the prefix cache now


def _event_chunks(event: Event, timer: _Timer, out: TextOutput) -> Iterator[GenerationChunk]:
    lps: Sequence[TokenLogprob | None] = event.logprobs or [None] * len(event.new_token_ids)
    last = len(event.new_token_ids) - 1
    for i, (token, lp) in enumerate(zip(event.new_token_ids, lps, strict=True)):
        timer.generated += 1
        text, stopped = out.push(token)
        finish = event.finish_reason if i == last else None
        if stopped:
            yield timer.chunk(text, token, lp, "stop")
            return
        if finish is not None:
            text += out.finish()  # a stop string can still complete in the held-back text
            finish = "stop" if out.stopped else finish
        yield timer.chunk(text, token, lp, finish)
    if not event.new_token_ids and event.finish_reason is not None:
        if event.finish_reason == "stop":
            timer.generated += 1  # the stop token was generated, though it is not shown
        yield timer.chunk(out.finish(), None, None, event.finish_reason)


def generate_stream(
    model: ModelProtocol,
    tokenizer: Tokenizer,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    *,
    engine: Engine | None = None,
    context_length: int | None = None,
    prefill_step_size: int = 512,
    constraint: Constraint | None = None,
) -> Generator[GenerationChunk, None, None]:
    """Stream the completion of `prompt_ids` (see GenerationChunk) on `engine`, or on an engine
    of its own for this one request (`context_length` bounds it; prompts are computed
    `prefill_step_size` tokens a step). Raises ContextLengthExceededError when prompt +
    max_tokens exceed the context, InvalidRequestError for an empty prompt or bad params."""
    if engine is not None:
        yield from stream_request(engine, tokenizer, prompt_ids, params, constraint=constraint)
        return
    with local_engine(
        model, tokenizer, context_length,
        max_running=1, max_tokens_per_step=max(1, prefill_step_size), cache_memory_bytes=0,
    ) as own:  # fmt: skip
        yield from stream_request(own, tokenizer, prompt_ids, params, constraint=constraint)


def generate(
    model: ModelProtocol,
    tokenizer: Tokenizer,
    prompt: str | Sequence[int],
    params: SamplingParams | None = None,
    **kwargs: Any,
) -> str:
    """The whole completion as one string (a prompt string is encoded with the tokenizer)."""
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
    params = params or SamplingParams()
    return "".join(c.text for c in generate_stream(model, tokenizer, ids, params, **kwargs))
