"""The engine's per-request machinery: the decode batch, per-row sampling, event delivery.

`DecodeBatch` holds every decoding request's KV in one left-padded batch cache per layer
(mlx-lm's BatchKVCache, or the batch form of whatever cache the architecture uses), the token
each row feeds next, and the row order. Requests join when their prefill completes (their own
cache is merged in) and leave by `keep` (the batch is filtered).

`sample_rows` turns a step's logits into tokens with each request's own parameters: penalties
and logit_bias on its row, its own sampler and RNG, its own logprobs. Batching never depends on
what the requests ask for.

`RequestStream` / `SyncStream` carry one request's events from the engine thread to an asyncio
consumer (via `call_soon_threadsafe`) or a blocking one.
"""

from __future__ import annotations

import asyncio
import logging
import queue
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import BatchKVCache, KVCache

from mlxrun.distributed import broadcast
from mlxrun.sampling import (
    Sampler,
    SamplingParams,
    apply_penalties,
    compute_logprobs,
    sample_batch,
    token_logprobs,
    top_logprobs,
)

if TYPE_CHECKING:
    from mlxrun.constrain import Constraint
    from mlxrun.engine import Request
    from mlxrun.models import ModelProtocol

logger = logging.getLogger(__name__)


def can_merge(cache: Sequence[Any]) -> bool:
    """Whether mlx-lm can merge this architecture's per-request caches into a batch cache."""
    return all(callable(getattr(type(c), "merge", None)) for c in cache)


def _merge_layer(layer: list) -> Any:
    return type(layer[0]).merge(layer)


class GroupedMaskBatchKVCache(BatchKVCache):
    """A BatchKVCache whose attention mask has an axis for grouped query heads: mlx-lm's gemma2
    computes scores as (B, n_kv_heads, repeats, L, S), which a (B, 1, L, S) mask cannot
    broadcast against."""

    def make_mask(self, N: int, return_array: bool = False, **kwargs: Any) -> Any:
        mask = super().make_mask(N, return_array=return_array, **kwargs)
        return mask[:, :, None] if isinstance(mask, mx.array) and mask.ndim == 4 else mask

    @classmethod
    def merge(cls, caches: list) -> Any:
        out = super().merge(caches)
        out.__class__ = cls  # mlx-lm builds a plain BatchKVCache when every cache is empty
        return out


def _batched_error(
    model: ModelProtocol, make_cache: Callable[[], list[Any]], merge: Callable[[list[Any]], Any]
) -> float:
    """Prompts of different lengths (left-padded by up to 15) decoded one step as a batch of 3
    (a size unlikely to broadcast by accident against head counts) vs each alone: the largest
    relative L2 error of a row's logits."""
    prompts, alone, caches = [list(range(1, 17)), [5], [9, 8, 7, 6]], [], []
    for p in prompts:
        cache, solo = make_cache(), make_cache()
        model(mx.array(p)[None], cache=cache)
        model(mx.array(p)[None], cache=solo)
        caches.append(cache)
        alone.append(model(mx.array([[7]]), cache=solo)[:, -1])
    batch = [merge(list(layer)) for layer in zip(*caches, strict=True)]
    together = model(mx.array([[7]] * len(prompts)), cache=batch)[:, -1].astype(mx.float32)
    ref = mx.concatenate(alone).astype(mx.float32)
    err = mx.sqrt(((together - ref) ** 2).sum(-1)) / mx.sqrt((ref**2).sum(-1))
    return float(mx.max(err).item())  # type: ignore[arg-type]  # item() of a real array


# bf16 noise across kernels is ~1e-2; a row reading another's positions or garbage is ~1. The
# check is for gross breakage: attention code that cannot take a batch cache raises instead.
BATCH_TOLERANCE = 0.5


def batch_merge(
    model: ModelProtocol, make_cache: Callable[[], list[Any]]
) -> Callable[[list[Any]], Any] | None:
    """How this architecture's per-request caches merge into a batch cache that decodes
    correctly: mlx-lm's own `merge`, the grouped-mask variant, or None (decode one at a time).
    Found by trying them on two tiny prompts, so new architectures need no list here."""
    cache = make_cache()
    candidates: list[Callable[[list[Any]], Any]] = []
    if can_merge(cache):
        candidates.append(_merge_layer)
    if all(type(c) is KVCache for c in cache):
        candidates.append(GroupedMaskBatchKVCache.merge)
    for merge in candidates:
        try:
            err = _batched_error(model, make_cache, merge)
        except (ValueError, RuntimeError, TypeError, AttributeError) as e:
            logger.info("batch cache %s does not fit this model: %s", merge, e)
            continue
        logger.info("batched decode vs alone: relative error %.3g (%s)", err, merge)
        if err <= BATCH_TOLERANCE:
            return merge
    logger.warning("this model cannot decode batched: requests will run one at a time")
    return None


class RowSampler:
    """One request's sampling state: params, its Sampler (own RNG), generated-token history."""

    __slots__ = ("params", "sampler", "history", "constraint")

    def __init__(self, params: SamplingParams, constraint: Constraint | None = None):
        self.params = params
        self.sampler = Sampler(params)
        self.history: mx.array | None = None  # (n,) generated ids, kept only for penalties
        self.constraint = constraint  # a mlxrun.constrain.Constraint, or None

    def process(self, logits: mx.array, new_token: mx.array | None) -> mx.array:
        """Penalties + logit_bias on this row's logits (1, V); `new_token` (1,) joins the history."""
        if not self.params.has_logits_processing:
            return logits
        if new_token is not None:
            tok = new_token.astype(mx.int32)
            self.history = tok if self.history is None else mx.concatenate([self.history, tok])
        history = self.history if self.history is not None else mx.array([], dtype=mx.int32)
        return apply_penalties(logits, history, self.params)


def sample_rows(
    logits: mx.array,
    rows: Sequence[RowSampler],
    inputs: mx.array | None = None,
    generated: Sequence[bool] | None = None,
) -> tuple[mx.array, list[tuple[mx.array, ...] | None]]:
    """logits (B, V) -> (tokens (B,), per row: (logprob (1,), top ids (1, k), top lps (1, k)) or
    None). `inputs` (B,) are the tokens this step fed in; where `generated[i]`, row i's input
    was a generated token and joins its penalty history (a prompt's last token does not)."""
    if any(r.params.has_logits_processing for r in rows):
        parts = [
            r.process(
                logits[i : i + 1],
                inputs[i : i + 1] if inputs is not None and generated and generated[i] else None,
            )
            for i, r in enumerate(rows)
        ]
        logits = mx.concatenate(parts, axis=0)
    if any(r.constraint is not None for r in rows):
        logits = _constrain(logits, rows, inputs, generated)
    logprobs = compute_logprobs(logits)  # (B, V) float32
    if all(r.params.is_greedy for r in rows):
        tokens = mx.argmax(logprobs, axis=-1)
    else:
        tokens = sample_batch([r.sampler for r in rows], logprobs)
    extras: list[tuple[mx.array, ...] | None] = []
    for i, r in enumerate(rows):
        if not r.params.logprobs:
            extras.append(None)
            continue
        lp = logprobs[i : i + 1]
        extras.append(
            (token_logprobs(lp, tokens[i : i + 1]), *top_logprobs(lp, r.params.top_logprobs))
        )
    return tokens.astype(mx.uint32), extras


def _constrain(
    logits: mx.array,
    rows: Sequence[RowSampler],
    inputs: mx.array | None,
    generated: Sequence[bool] | None,
) -> mx.array:
    """Grammar masks on the constrained rows. Each grammar first takes the token its row fed in,
    so this waits for the previous step's sample: only batches with a constrained row lose the
    overlap of sampling and the next forward pass."""
    from mlxrun.constrain import allowed_mask

    fed = None
    if inputs is not None and generated and any(generated):
        fed = np.array(inputs)  # waits for the last step's sampling
    for i, r in enumerate(rows):
        if r.constraint is not None and fed is not None and generated is not None and generated[i]:
            r.constraint.advance(int(fed[i]))
    mask = allowed_mask([r.constraint for r in rows], logits.shape[-1])
    return mx.where(mx.array(mask), logits, mx.array(-mx.inf, dtype=logits.dtype))


class RequestState:
    """The engine thread's state of one request (a `mlxrun.engine.Request`)."""

    def __init__(
        self, request: Request, sink: Any, stop_ids: frozenset[int], budget: int, namespace: tuple
    ):
        self.sink, self.stop_ids, self.budget = sink, stop_ids, budget
        self.id, self.namespace = request.id, namespace
        self.prompt = [int(t) for t in request.prompt_token_ids]
        self.params = request.params
        self.constraint = getattr(request, "constraint", None)
        self.pin = min(getattr(request, "pin_prefix", 0), len(self.prompt))
        self.row: RowSampler  # made at admission, on the engine thread (MLX streams are per thread)
        self.generated: list[int] = []  # every sampled token read back, a final stop token too
        self.cache: Any = None  # its own KV cache (one entry a layer) while prefilling, then None
        self.computed = 0  # prompt tokens the scheduler counts as computed
        self.kv = 0  # tokens of prompt + generated whose KV exists
        self.cached = 0
        self.reuse: Any = None  # a mlxrun.kv_reuse.ReusePlan when cache_reuse found runs
        self.prediction = list(getattr(request, "prediction", None) or [])
        self.spec: Any = None  # a mlxrun.spec_step.RowSpec while it speculates
        self.done = False


class DecodeBatch:
    """Rows decoding together: ids, batch caches (one per layer), and the token each row feeds
    next: sampled last step and still lazy (`generated`), or for a row that just joined, its
    prompt's last token, whose forward pass samples the first token batched with the others."""

    def __init__(self, merge: Any = _merge_layer) -> None:
        self.merge = merge  # one layer's per-request caches -> batch cache; None: one row at most
        self.ids: list[str] = []
        self.caches: list | None = None
        self.tokens: mx.array | None = None  # (B,) uint32
        self.extras: list[tuple[mx.array, ...] | None] = []  # logprobs of the sampled tokens
        self.generated: list[bool] = []

    def __len__(self) -> int:
        return len(self.ids)

    def index(self, request_id: str) -> int:
        return self.ids.index(request_id)

    def join(
        self,
        model: ModelProtocol,
        ids: list[str],
        caches: list[list],
        rests: list[list[int]],
        last: list[int],
    ) -> None:
        """Requests whose prompts are computed up to `rests` (then `last`, one token each) join:
        their caches are merged, the rests run as one right-padded forward pass (mlx-lm's prompt
        batching: k prompts, one pass over the weights), and each row will feed its last token,
        whose forward pass in the next step samples its first token batched with the rest."""
        if not ids:
            return
        if self.merge is None:
            if self.ids or len(ids) > 1:
                raise RuntimeError("this architecture's cache cannot be batched")
            merged = caches[0]
        else:
            merged = [self.merge(list(layer)) for layer in zip(*caches, strict=True)]
        lengths = [len(r) for r in rests]
        width = max(lengths)
        if width:
            pad = [width - n for n in lengths]
            tokens = mx.array([r + [0] * p for r, p in zip(rests, pad, strict=True)])  # (k, width)
            if max(pad):  # pads sit after the real tokens: causal masking keeps them unseen
                for c in merged:
                    c.prepare(lengths=lengths, right_padding=pad)
            model(tokens, cache=merged)  # logits never evaluated: only the KV is computed
            if max(pad):
                for c in merged:
                    c.finalize()  # rolls the pads to the left, where the mask hides them
            mx.async_eval([c.state for c in merged])
        if self.caches is None:
            self.caches = merged
        else:
            for mine, theirs in zip(self.caches, merged, strict=True):
                mine.extend(theirs)
        self.ids += ids
        self.extras += [None] * len(ids)
        self.generated += [False] * len(ids)
        new = mx.array(last, dtype=mx.uint32)
        self.tokens = new if self.tokens is None else mx.concatenate([self.tokens, new])
        mx.async_eval(self.tokens)  # its own result: reading it must not wait for the next step

    def keep(self, indices: list[int]) -> None:
        """Keep only these rows, in this order."""
        if len(indices) == len(self.ids):
            return
        if not indices:
            self.ids, self.caches, self.tokens, self.extras, self.generated = [], None, None, [], []
            return
        assert self.caches is not None and self.tokens is not None
        for c in self.caches:
            c.filter(indices)
        self.tokens = self.tokens[mx.array(indices)]
        mx.async_eval(self.tokens)
        self.ids = [self.ids[i] for i in indices]
        self.extras = [self.extras[i] for i in indices]
        self.generated = [self.generated[i] for i in indices]

    def step(self, model: ModelProtocol, rows: Sequence[RowSampler]) -> tuple:
        """One decode step for every row, queued on the device. Returns what the rows fed in, to
        be read back now while it runs: (ids, tokens (B,), extras, generated flags)."""
        assert self.tokens is not None
        logits = model(self.tokens[:, None], cache=self.caches)[:, -1, :]  # (B, V)
        new, extras = sample_rows(logits, rows, self.tokens, self.generated)
        new = broadcast(new)  # distributed: every rank feeds rank 0's tokens (identity alone)
        mx.async_eval(new, [e for e in extras if e is not None])
        fed = (list(self.ids), self.tokens, self.extras, self.generated)
        self.tokens, self.extras, self.generated = new, extras, [True] * len(self.ids)
        return fed


# ---------------------------------------------------------------------------- delivery


def deliver(outbox: list[tuple[Any, Any]]) -> None:
    """Hand (stream, event or exception) pairs to their streams, from the engine thread: one
    `call_soon_threadsafe` per event loop per step, not one per token."""
    by_loop: dict[Any, list] = {}
    for stream, item in outbox:
        if stream.loop is None:
            stream.put(item)
        else:
            by_loop.setdefault(stream.loop, []).append((stream, item))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:  # the caller's loop is gone: nobody is listening
            for stream, _ in items:
                stream.abort()


def _put_all(items: list[tuple[Any, Any]]) -> None:  # on the caller's event loop
    for stream, item in items:
        stream.put(item)


def _settle(stream: Any, item: Any) -> Any:
    """One queued item for a stream: an event (the last one ends it) or the error that ended it."""
    if isinstance(item, BaseException):
        stream.finished = True
        raise item
    if item.finish_reason is not None:
        stream.finished = True
    return item


class RequestStream:
    """A request's events as an async iterator (from Engine.submit). Leaving an `async with`
    block early, or `abort()`, stops the request."""

    def __init__(
        self, request_id: str, abort: Callable[[str], None], loop: asyncio.AbstractEventLoop
    ):
        self.id, self._abort, self.loop = request_id, abort, loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self.put = self._queue.put_nowait  # called on `loop`
        self.finished = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> Any:
        if self.finished:
            raise StopAsyncIteration
        return _settle(self, await self._queue.get())

    def abort(self) -> None:
        if not self.finished:
            self._abort(self.id)

    async def aclose(self) -> None:
        self.abort()

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.abort()


class SyncStream:
    """A request's events as a blocking iterator (from Engine.submit_sync)."""

    def __init__(self, request_id: str, abort: Callable[[str], None]):
        self.id, self._abort = request_id, abort
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.put = self._queue.put
        self.loop = None
        self.finished = False

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        if self.finished:
            raise StopIteration
        return _settle(self, self._queue.get())

    def abort(self) -> None:
        if not self.finished:
            self._abort(self.id)
