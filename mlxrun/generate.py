"""One sequence, start to finish: chunked prefill into the KV cache, then pipelined decoding.

    for chunk in generate_stream(model, tokenizer, ids, SamplingParams(temperature=0)):
        print(chunk.text, end="")

Decoding keeps the device busy: the graph for token n+1 is built and handed to `mx.async_eval`
before token n is read back and yielded, so Python's per-token work overlaps the forward pass.
A `PromptCache` keeps a conversation's KV between calls; each call prefills only the tokens the
cache does not already hold.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from mlxrun import memory, models
from mlxrun.budget import output_budget
from mlxrun.distributed import shared_sampler
from mlxrun.errors import InvalidRequestError
from mlxrun.sampling import (
    SamplingParams,
    compute_logprobs,
    make_logits_processors,
    make_sampler,
    token_logprobs,
    top_logprobs,
)

_stream: Any = None  # created on first use: importing this module must not touch the device


def _generation_stream() -> Any:
    global _stream
    if _stream is None:
        _stream = mx.new_stream(mx.default_device())
    return _stream


@dataclass(frozen=True)
class GenerationChunk:
    """One step of output. `token_id` is None on a closing chunk that carries no output token
    (an EOS or stop token); `finish_reason` is None until the last chunk ("stop" or "length")."""

    text: str
    token_id: int | None
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    prefilled_tokens: int = 0  # prompt tokens computed this call (the rest came from the cache)
    generation_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tps: float = 0.0
    peak_memory_gb: float = 0.0


class PromptCache:
    """A sequence's KV cache plus the token ids it holds, kept across calls (e.g. chat turns).

    Pass the whole conversation's ids each turn: the common prefix is reused, a diverging tail is
    trimmed off the cache, and only the rest is prefilled.
    """

    def __init__(self, model: Any):
        self.model = model
        self.cache: list = models.make_cache(model)
        self.token_ids: list[int] = []

    def __len__(self) -> int:
        return len(self.token_ids)

    def prefix_len(self, ids: Sequence[int]) -> int:
        """How many leading ids of `ids` the cache already holds."""
        n = 0
        for a, b in zip(self.token_ids, ids, strict=False):
            if a != b:
                break
            n += 1
        return n

    def reset(self) -> None:
        self.cache = models.make_cache(self.model)
        self.token_ids = []

    def trim_to(self, keep: int) -> int:
        """Keep the first `keep` cached tokens; returns how many remain (0 after a reset, when
        the cache cannot be trimmed, e.g. a sliding window that has already wrapped)."""
        from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

        drop = len(self.token_ids) - keep
        if drop <= 0:
            return len(self.token_ids)
        if can_trim_prompt_cache(self.cache) and trim_prompt_cache(self.cache, drop) == drop:
            del self.token_ids[keep:]
            return keep
        self.reset()
        return 0

    def _in_sync(self) -> bool:
        """Whether the cache holds exactly `token_ids` (not so after an interrupted step)."""
        offsets = {c.offset for c in self.cache if isinstance(getattr(c, "offset", None), int)}
        return offsets <= {len(self.token_ids)}

    def prepare(self, ids: Sequence[int]) -> int:
        """Trim to the longest reusable prefix of `ids` and return its length. At least the last
        id is always left to compute, since its logits pick the next token."""
        if not self._in_sync():
            self.reset()
        return self.trim_to(min(self.prefix_len(ids), len(ids) - 1))


def check_context(prompt_tokens: int, max_tokens: int | None, limit: int | None) -> None:
    """ContextLengthExceededError when the prompt plus the tokens asked for do not fit (the
    budget rule of mlxrun.budget, strict: a terminal user asked for exactly that many)."""
    output_budget(prompt_tokens, max_tokens, limit, strict=True)


class _Decoder:
    """The per-step graph: forward one chunk, penalties, logprobs, sample (all lazy)."""

    def __init__(self, model: Any, pc: PromptCache, params: SamplingParams):
        self.model, self.pc, self.params = model, pc, params
        self.sampler = shared_sampler(make_sampler(params))  # rank 0's tokens when distributed
        self.processors = make_logits_processors(params)
        self.history: mx.array | None = None  # generated ids, for the penalties

    def prefill(self, ids: list[int], step_size: int) -> None:
        """Run all but the caller's last id through the model in chunks, filling the cache."""
        for start in range(0, len(ids), step_size):
            chunk = ids[start : start + step_size]
            self.model(mx.array(chunk)[None], cache=self.pc.cache)
            mx.eval([c.state for c in self.pc.cache])
            self.pc.token_ids.extend(chunk)
            mx.clear_cache()

    def step(self, ids: mx.array, generated: bool) -> tuple[mx.array, ...]:
        """ids (L,) -> (token (1,), token logprob (1,), top ids (1, k), top logprobs (1, k))."""
        logits = self.model(ids[None], cache=self.pc.cache)[:, -1, :]  # (1, V)
        if self.processors:
            if generated:
                self.history = ids if self.history is None else mx.concatenate([self.history, ids])
            history = self.history if self.history is not None else mx.array([], mx.int32)
            for process in self.processors:
                logits = process(history, logits)
        logprobs = compute_logprobs(logits)  # (1, V) float32
        token = self.sampler(logprobs)
        out: tuple[mx.array, ...] = (token,)
        if self.params.logprobs:
            out += (
                token_logprobs(logprobs, token),
                *top_logprobs(logprobs, self.params.top_logprobs),
            )
        mx.async_eval(*out)
        return out


class _Stats:
    def __init__(self, prompt_tokens: int, prefilled: int):
        self.prompt_tokens, self.prefilled = prompt_tokens, prefilled
        self.start = time.perf_counter()
        self.first_token: float | None = None
        self.generated = 0

    def chunk(self, text: str, token_id: int | None, extra: tuple, finish: str | None):
        now = time.perf_counter()
        if self.first_token is None:
            self.first_token = now
        prompt_s = self.first_token - self.start
        decode_s = now - self.first_token
        logprob = top = None
        if extra and token_id is not None:
            logprob = float(extra[0].item())
            ids, values = extra[1].tolist()[0], extra[2].tolist()[0]
            top = tuple(zip(ids, values, strict=True))
        return GenerationChunk(
            text=text,
            token_id=token_id,
            logprob=logprob,
            top_logprobs=top,
            finish_reason=finish,
            prompt_tokens=self.prompt_tokens,
            prefilled_tokens=self.prefilled,
            generation_tokens=self.generated,
            prompt_tps=self.prefilled / prompt_s if prompt_s > 0 else 0.0,
            generation_tps=(self.generated - 1) / decode_s if decode_s > 0 else 0.0,
            peak_memory_gb=mx.get_peak_memory() / 1e9,
        )


def _stop_ids(tokenizer: Any, params: SamplingParams) -> frozenset[int]:
    ids = set(params.stop_token_ids)
    if not params.ignore_eos:
        ids.update(tokenizer.eos_token_ids)
    return frozenset(ids)


def _token_budget(prompt_tokens: int, params: SamplingParams, limit: int | None) -> int:
    """How many tokens may be generated: max_tokens, else what is left of the context (-1: no cap)."""
    if limit is None:
        return params.max_tokens if params.max_tokens is not None else -1
    return output_budget(prompt_tokens, params.max_tokens, limit, strict=True).granted


def generate_stream(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    *,
    cache: PromptCache | None = None,
    context_length: int | None = None,
    prefill_step_size: int = 512,
) -> Iterator[GenerationChunk]:
    """Stream the completion of `prompt_ids` chunk by chunk (see GenerationChunk).

    With `cache`, `prompt_ids` is the whole sequence so far (e.g. the full chat); the tokens the
    cache already holds are not computed again, and the cache holds this call's tokens after it.
    Raises ContextLengthExceededError (before any work) when prompt + max_tokens exceed
    `context_length`.
    """
    ids = [int(t) for t in prompt_ids]
    if not ids:
        raise InvalidRequestError("the prompt is empty", param="prompt")
    check_context(len(ids), params.max_tokens, context_length)
    info = memory.device_memory()
    with memory.wired_limit(info.recommended_bytes or info.budget_bytes):
        with mx.stream(_generation_stream()):
            yield from _run(model, tokenizer, ids, params, cache, context_length, prefill_step_size)


def _run(
    model: Any,
    tokenizer: Any,
    ids: list[int],
    params: SamplingParams,
    cache: PromptCache | None,
    limit: int | None,
    step_size: int,
) -> Iterator[GenerationChunk]:
    from mlxrun.output import TextOutput

    pc = cache if cache is not None else PromptCache(model)
    kept = pc.prepare(ids)
    stats = _Stats(len(ids), len(ids) - kept)
    mx.reset_peak_memory()
    dec = _Decoder(model, pc, params)
    dec.prefill(ids[kept:-1], max(1, step_size))
    out = TextOutput(tokenizer, params.stop)
    stop_ids = _stop_ids(tokenizer, params)
    budget = _token_budget(len(ids), params, limit)

    current = dec.step(mx.array(ids[-1:]), generated=False)
    pc.token_ids.append(ids[-1])
    while True:
        last = stats.generated + 1 == budget
        if not last:  # queue the next forward pass before reading this token back
            upcoming = dec.step(current[0], generated=True)
        token = int(current[0].item())
        stats.generated += 1
        if not last:
            pc.token_ids.append(token)
        if token in stop_ids:
            yield stats.chunk(out.flush(), None, (), "stop")
            return
        text, stopped = out.feed_token(token)
        if stopped or last:
            if not stopped:
                text += out.flush()  # a stop string can still complete in the held-back text
            finish = "stop" if out.stopped else "length"
            yield stats.chunk(text, token, current[1:], finish)
            return
        yield stats.chunk(text, token, current[1:], None)
        if stats.generated % 256 == 0:
            mx.clear_cache()
        current = upcoming


def generate(
    model: Any,
    tokenizer: Any,
    prompt: str | Sequence[int],
    params: SamplingParams | None = None,
    **kwargs: Any,
) -> str:
    """The whole completion as one string (a prompt string is encoded with the tokenizer)."""
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
    params = params or SamplingParams()
    return "".join(c.text for c in generate_stream(model, tokenizer, ids, params, **kwargs))
