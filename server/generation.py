"""One API call's choices: n engine requests merged into one stream of text deltas.

Per choice: Request -> engine events (token ids) -> TextOutput (detokenize, cut at stop strings).
A stop string ends the choice here (finish_reason "stop") and aborts its engine request. Closing
the generation (client gone, error, server shutdown) aborts every choice still running.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mlxrun.engine import Event, Request, TokenLogprob
from mlxrun.output import TextOutput
from mlxrun.sampling import SamplingParams

from . import access
from .metrics import Metrics

if TYPE_CHECKING:
    from mlxrun.batch import RequestStream
    from mlxrun.constrain import Constraint
    from mlxrun.engine import Engine
    from mlxrun.tokenizer import Tokenizer


@dataclass(frozen=True)
class ChoiceSpec:
    prompt_ids: list[int]
    params: SamplingParams
    stops: tuple[str, ...] = ()
    priority: int = 0  # higher first: interactive requests (autocomplete) use 1
    group: str | None = None  # a new request cancels unfinished older ones of its group
    constraint: Constraint | None = None  # decoding follows its grammar
    pin_prefix: int = 0  # prompt tokens to keep in the prefix cache (Anthropic cache_control)
    keep_special: bool = False  # special tokens stay in the text (tool-call / reasoning markers)
    namespace: str | None = None  # prefix-cache scope (an API key's: its pins are its own)
    prediction: tuple[int, ...] | None = None  # Predicted Outputs: token ids to verify


@dataclass
class Delta:
    """New output of one choice: text (possibly empty while a stop string is undecided), the
    logprobs of the tokens behind it, and the finish reason on its last delta."""

    index: int
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None


class _Choice:
    def __init__(self, index: int, request_id: str, spec: ChoiceSpec, tokenizer: Tokenizer):
        self.index, self.request_id, self.spec = index, request_id, spec
        self.output = TextOutput(tokenizer, spec.stops, skip_special_tokens=not spec.keep_special)
        self.stream: RequestStream | None = None
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.reused_chunk_tokens = 0  # of cached_tokens, reused past the prefix (--cache-reuse)
        self.prediction = (0, 0)  # (accepted, rejected) prediction tokens so far
        self.last_token_at: float | None = None


class Generation:
    """Submit with `start()` (EngineOverloadedError / InvalidRequestError surface there, before any
    response is sent), iterate `deltas()`, and always `aclose()`."""

    def __init__(
        self,
        engine: Engine,
        tokenizer: Tokenizer,
        specs: Sequence[ChoiceSpec],
        request_id: str,
        metrics: Metrics | None = None,
        arrival: float | None = None,
    ):
        self.engine = engine
        self.metrics = metrics or Metrics()
        self.arrival = time.perf_counter() if arrival is None else arrival
        self.choices = [
            _Choice(i, f"{request_id}-{i}", spec, tokenizer) for i, spec in enumerate(specs)
        ]
        self._queue: asyncio.Queue = asyncio.Queue()
        self._pumps: list[asyncio.Task] = []
        self._first_token = False
        # An engine event came: the prefix-cache hit (cached_tokens) is known.
        self.looked_up = False

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens of the distinct prompts (n choices of one prompt count it once)."""
        seen: dict[tuple[int, ...], int] = {}
        for c in self.choices:
            seen.setdefault(tuple(c.spec.prompt_ids), len(c.spec.prompt_ids))
        return sum(seen.values())

    @property
    def cached_tokens(self) -> int:
        seen: dict[tuple[int, ...], int] = {}
        for c in self.choices:
            key = tuple(c.spec.prompt_ids)
            seen[key] = max(seen.get(key, 0), c.cached_tokens)
        return sum(seen.values())

    @property
    def reused_chunk_tokens(self) -> int:
        seen: dict[tuple[int, ...], int] = {}
        for c in self.choices:
            key = tuple(c.spec.prompt_ids)
            seen[key] = max(seen.get(key, 0), c.reused_chunk_tokens)
        return sum(seen.values())

    def matched_stop(self, index: int) -> str | None:
        """The stop string that ended choice `index`, if one did."""
        return self.choices[index].output.matched_stop

    @property
    def prediction_tokens(self) -> tuple[int, int]:
        """(accepted, rejected) tokens of the requests' predictions, over every choice."""
        return tuple(sum(c.prediction[i] for c in self.choices) for i in (0, 1))  # type: ignore

    @property
    def completion_tokens(self) -> int:
        return sum(c.completion_tokens for c in self.choices)

    def start(self) -> None:
        """Submit every choice; on a refusal, abort the ones already queued and re-raise."""
        try:
            for c in self.choices:
                spec = c.spec
                c.stream = self.engine.submit(
                    Request(
                        c.request_id,
                        spec.prompt_ids,
                        spec.params,
                        priority=spec.priority,
                        group=spec.group,
                        constraint=spec.constraint,
                        pin_prefix=spec.pin_prefix,
                        namespace=spec.namespace,
                        prediction=spec.prediction,
                    )
                )
        except BaseException:
            self._abort_all()
            raise
        self._pumps = [asyncio.ensure_future(self._pump(c)) for c in self.choices]

    async def _pump(self, choice: _Choice) -> None:
        assert choice.stream is not None  # submitted before the pumps start
        try:
            async for event in choice.stream:
                self._queue.put_nowait((choice, event))
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which reports it
            self._queue.put_nowait((choice, e))
        self._queue.put_nowait((choice, None))

    async def deltas(self) -> AsyncIterator[Delta]:
        """Deltas of all choices in arrival order, each choice ending with a finish_reason."""
        open_choices = len(self.choices)
        while open_choices:
            choice, item = await self._queue.get()
            if item is None:
                open_choices -= 1
                if choice.finish_reason is None:  # the stream ended without saying why
                    yield self._finish(choice, "abort")
                continue
            if isinstance(item, BaseException):
                raise item
            delta = self._apply(choice, item)
            if delta is not None:
                yield delta

    def _apply(self, choice: _Choice, event: Event) -> Delta | None:
        if choice.finish_reason is not None:
            return None  # events after a stop string: the abort is on its way
        choice.cached_tokens = event.cached_tokens
        choice.reused_chunk_tokens = event.reused_chunk_tokens
        choice.prediction = (event.accepted_prediction_tokens, event.rejected_prediction_tokens)
        self.looked_up = True
        self._time_tokens(choice, len(event.new_token_ids))
        delta = Delta(choice.index)
        texts = []
        for k, token in enumerate(event.new_token_ids):
            choice.completion_tokens += 1
            text, stopped = choice.output.push(token)
            texts.append(text)
            if event.logprobs is not None and k < len(event.logprobs):
                delta.logprobs.append(event.logprobs[k])
            if stopped:
                self.engine.abort(choice.request_id)
                choice.finish_reason = "stop"
                self.metrics.aborted += 1
                break
        if choice.finish_reason is None and event.finish_reason is not None:
            texts.append(choice.output.finish())
            choice.finish_reason = "stop" if choice.output.stopped else event.finish_reason
            if event.finish_reason == "abort":
                self.metrics.aborted += 1
        delta.text = "".join(texts)
        delta.finish_reason = choice.finish_reason
        self.metrics.generation_tokens += len(event.new_token_ids)
        if delta.text or delta.logprobs or delta.finish_reason:
            return delta
        return None

    def _finish(self, choice: _Choice, reason: str) -> Delta:
        text = choice.output.finish()
        choice.finish_reason = "stop" if choice.output.stopped else reason
        return Delta(choice.index, text, [], choice.finish_reason)

    def _time_tokens(self, choice: _Choice, n: int) -> None:
        if not n:
            return
        now = time.perf_counter()
        if not self._first_token:
            self._first_token = True
            self.metrics.ttft.observe(now - self.arrival)
        if choice.last_token_at is not None:
            gap = (now - choice.last_token_at) / n
            for _ in range(n):
                self.metrics.itl.observe(gap)
        choice.last_token_at = now

    def _abort_all(self) -> None:
        for c in self.choices:
            if c.stream is not None and c.finish_reason is None and not c.stream.finished:
                self.engine.abort(c.request_id)
                self.metrics.aborted += 1

    async def aclose(self) -> None:
        """Abort what still runs and stop the pumps (idempotent; safe when cancelled)."""
        self._abort_all()
        for task in self._pumps:
            task.cancel()
        if self._pumps:
            await asyncio.gather(*self._pumps, return_exceptions=True)
        self._pumps = []

    def record_usage(self) -> None:
        self.metrics.prompt_tokens += self.prompt_tokens
        self.metrics.cached_tokens += self.cached_tokens
        record = access.current()  # the access log line shows the tokens
        record.prompt_tokens += self.prompt_tokens
        record.completion_tokens += self.completion_tokens

    async def collect(self) -> list[tuple[str, list[TokenLogprob], str]]:
        """Run to the end: (text, logprobs, finish_reason) per choice, in choice order."""
        texts: list[list[str]] = [[] for _ in self.choices]
        lps: list[list[TokenLogprob]] = [[] for _ in self.choices]
        async for delta in self.deltas():
            texts[delta.index].append(delta.text)
            lps[delta.index].extend(delta.logprobs)
        return [
            ("".join(t), lp, c.finish_reason or "stop")
            for t, lp, c in zip(texts, lps, self.choices, strict=True)
        ]
