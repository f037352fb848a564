"""Sampling: request parameters, logits processors and per-request samplers.

One step for a request, with `logits` of shape (B, V) taken at the last position:

    logits   = apply_penalties(logits, history, params)  # repetition, presence, frequency, bias
    logprobs = compute_logprobs(logits)                  # (B, V) float32, reported to the client
    tokens   = sampler(logprobs)                         # (B,) uint32; sampler = Sampler(params)

Logprobs are reported from the distribution after penalties and logit_bias but before temperature and
the top-k / top-p / min-p filters: with no penalties that is the model's own distribution (what OpenAI
reports), and a token forced or banned by logit_bias shows the probability it was actually drawn with.

Filters run in the order top_k -> top_p -> min_p on the untempered distribution (top_p renormalises what
top_k left), then temperature reshapes the survivors and one token is drawn (llama.cpp's chain order;
mlx-lm likewise filters before applying temperature). temperature 0 or top_k 1 is greedy.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from mlxrun.errors import InvalidRequestError

MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20
LOGIT_BIAS_LIMIT = 100.0
PENALTY_LIMIT = 2.0  # OpenAI's range for presence/frequency penalties

LogitsProcessor = Callable[[Sequence[int] | mx.array, mx.array], mx.array]


def _bad(param: str, message: str) -> InvalidRequestError:
    return InvalidRequestError(f"{param} {message}", param=param)


def _real(param: str, value: object) -> float:
    """A finite int/float (bools are rejected: True is not a temperature)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(param, f"must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise _bad(param, f"must be finite, got {value}")
    return float(value)


def _integer(param: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(param, f"must be an integer, got {type(value).__name__}")
    return value


def _flag(param: str, value: object) -> None:
    if not isinstance(value, bool):
        raise _bad(param, f"must be true or false, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How one request picks its tokens. Defaults follow the OpenAI API (temperature 1, no filters)."""

    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # in (0, 1]; 1 = off
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # in [0, 1]; 0 = off
    repetition_penalty: float = 1.0  # > 0; 1 = off; over the last repetition_context_size tokens
    repetition_context_size: int = 64
    presence_penalty: float = 0.0  # -2..2, once per distinct token in the history
    frequency_penalty: float = 0.0  # -2..2, times the token's count in the history
    logit_bias: dict[int, float] = field(default_factory=dict, hash=False)  # id -> -100..100
    seed: int | None = None  # None: a random seed per Sampler
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0  # 0..20 alternatives per token; needs logprobs
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        # Accept the shapes JSON gives us (a single stop string, lists) and store immutable copies.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif isinstance(self.stop, list):
            object.__setattr__(self, "stop", tuple(self.stop))
        if isinstance(self.stop_token_ids, list):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if self.logit_bias is None:
            object.__setattr__(self, "logit_bias", {})
        elif isinstance(self.logit_bias, Mapping):
            object.__setattr__(self, "logit_bias", dict(self.logit_bias))
        self.validate()

    def validate(self) -> None:
        """Raise InvalidRequestError(param=<field>) for the first invalid field."""
        self._validate_sampling()
        self._validate_penalties()
        self._validate_output()

    def _validate_sampling(self) -> None:
        if _real("temperature", self.temperature) < 0:
            raise _bad("temperature", f"must be >= 0, got {self.temperature}")
        if not 0 < _real("top_p", self.top_p) <= 1:
            raise _bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if _integer("top_k", self.top_k) < 0:
            raise _bad("top_k", f"must be >= 0 (0 turns it off), got {self.top_k}")
        if not 0 <= _real("min_p", self.min_p) <= 1:
            raise _bad("min_p", f"must be in [0, 1], got {self.min_p}")
        if self.seed is not None:
            _integer("seed", self.seed)

    def _validate_penalties(self) -> None:
        if _real("repetition_penalty", self.repetition_penalty) <= 0:
            raise _bad("repetition_penalty", f"must be > 0, got {self.repetition_penalty}")
        if _integer("repetition_context_size", self.repetition_context_size) < 1:
            raise _bad(
                "repetition_context_size", f"must be >= 1, got {self.repetition_context_size}"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = _real(name, getattr(self, name))
            if not -PENALTY_LIMIT <= value <= PENALTY_LIMIT:
                raise _bad(name, f"must be in [-2, 2], got {value}")
        if not isinstance(self.logit_bias, dict):
            raise _bad("logit_bias", "must map token ids to numbers")
        for token, bias in self.logit_bias.items():
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise _bad("logit_bias", f"keys must be token ids (integers >= 0), got {token!r}")
            if not -LOGIT_BIAS_LIMIT <= _real("logit_bias", bias) <= LOGIT_BIAS_LIMIT:
                raise _bad("logit_bias", f"values must be in [-100, 100], got {bias} for {token}")

    def _validate_output(self) -> None:
        if self.max_tokens is not None and _integer("max_tokens", self.max_tokens) < 1:
            raise _bad("max_tokens", f"must be >= 1, got {self.max_tokens}")
        if not isinstance(self.stop, tuple):
            raise _bad("stop", "must be a string or a list of strings")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise _bad("stop", f"allows at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise _bad("stop", f"entries must be non-empty strings, got {s!r}")
        if not isinstance(self.stop_token_ids, tuple):
            raise _bad("stop_token_ids", "must be a list of token ids")
        for t in self.stop_token_ids:
            if _integer("stop_token_ids", t) < 0:
                raise _bad("stop_token_ids", f"entries must be >= 0, got {t}")
        _flag("logprobs", self.logprobs)
        _flag("ignore_eos", self.ignore_eos)
        if not 0 <= _integer("top_logprobs", self.top_logprobs) <= MAX_TOP_LOGPROBS:
            raise _bad("top_logprobs", f"must be in [0, 20], got {self.top_logprobs}")
        if self.top_logprobs and not self.logprobs:
            raise _bad("top_logprobs", "needs logprobs to be enabled")

    def check_vocab(self, vocab_size: int) -> SamplingParams:
        """Reject logit_bias ids the model does not have; returns self for chaining."""
        for token in self.logit_bias:
            if token >= vocab_size:
                raise _bad(
                    "logit_bias", f"token id {token} is outside the vocabulary (size {vocab_size})"
                )
        return self

    def replace(self, **changes: Any) -> SamplingParams:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def has_logits_processing(self) -> bool:
        return bool(
            self.repetition_penalty != 1
            or self.presence_penalty
            or self.frequency_penalty
            or self.logit_bias
        )


# ---------------------------------------------------------------- logits processors


def _as_tokens(history: Sequence[int] | mx.array) -> mx.array:
    if isinstance(history, mx.array):
        return history.reshape(-1).astype(mx.int32)
    return mx.array(list(history), dtype=mx.int32)


def _counts(tokens: mx.array, vocab_size: int) -> mx.array:
    # (V,) float32: how often each id occurs; .at[].add accumulates duplicate ids.
    return mx.zeros((vocab_size,), dtype=mx.float32).at[tokens].add(1.0)


def apply_penalties(
    logits: mx.array, history: Sequence[int] | mx.array, params: SamplingParams
) -> mx.array:
    """Penalties then logit_bias on logits (B, V); returns a new (B, V) array of the same dtype.

    `history` (1-D token ids, shared by the B rows) is what the caller counts as "seen" — for OpenAI
    parity the tokens generated so far. Repetition looks at its last `repetition_context_size` ids
    (positive logits divided, negative multiplied); presence and frequency use the whole history.
    Bias comes last so that +100 / -100 hold whatever the penalties did.
    """
    if not params.has_logits_processing:
        return logits
    vocab_size = logits.shape[-1]
    tokens = _as_tokens(history)
    out = logits.astype(mx.float32)
    if tokens.size and params.repetition_penalty != 1:
        seen = _counts(tokens[-params.repetition_context_size :], vocab_size) > 0  # (V,)
        p = params.repetition_penalty
        out = mx.where(seen, mx.where(out < 0, out * p, out / p), out)
    if tokens.size and (params.presence_penalty or params.frequency_penalty):
        counts = _counts(tokens, vocab_size)  # (V,)
        out = out - (params.frequency_penalty * counts + params.presence_penalty * (counts > 0))
    if params.logit_bias:
        params.check_vocab(vocab_size)  # out-of-range scatter indices are undefined in MLX
        ids = mx.array(list(params.logit_bias.keys()), dtype=mx.int32)
        values = mx.array(list(params.logit_bias.values()), dtype=mx.float32)
        out = out.at[:, ids].add(values)
    return out.astype(logits.dtype)


def make_logits_processors(params: SamplingParams) -> list[LogitsProcessor]:
    """mlx-lm style processors `(tokens, logits) -> logits`; empty when there is nothing to do."""
    if not params.has_logits_processing:
        return []

    def process(tokens: Sequence[int] | mx.array, logits: mx.array) -> mx.array:
        return apply_penalties(logits, tokens, params)

    return [process]


# ---------------------------------------------------------------- logprobs


def compute_logprobs(logits: mx.array) -> mx.array:
    """(B, V) logits -> (B, V) float32 log-probabilities."""
    logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def top_logprobs(logprobs: mx.array, k: int) -> tuple[mx.array, mx.array]:
    """The k most likely tokens per row, most likely first: ids (B, k) int32, values (B, k)."""
    k = min(k, logprobs.shape[-1])
    if k <= 0:
        empty = (logprobs.shape[0], 0)
        return mx.zeros(empty, dtype=mx.int32), mx.zeros(empty, dtype=logprobs.dtype)
    ids = mx.argpartition(-logprobs, kth=k - 1, axis=-1)[..., :k]  # (B, k), unordered
    values = mx.take_along_axis(logprobs, ids, axis=-1)
    order = mx.argsort(-values, axis=-1)
    ids = mx.take_along_axis(ids, order, axis=-1).astype(mx.int32)
    return ids, mx.take_along_axis(values, order, axis=-1)


def token_logprobs(logprobs: mx.array, tokens: mx.array) -> mx.array:
    """The logprob of each chosen token: logprobs (B, V), tokens (B,) -> (B,)."""
    idx = tokens.astype(mx.int32).reshape(-1, 1)
    return mx.take_along_axis(logprobs, idx, axis=-1).reshape(-1)


# ---------------------------------------------------------------- filters and samplers

_NEG_INF = float("-inf")


def apply_top_k(logprobs: mx.array, k: int) -> mx.array:
    """Keep the k most likely tokens per row (B, V); ties at the edge are broken arbitrarily."""
    if k <= 0 or k >= logprobs.shape[-1]:
        return logprobs
    drop = mx.argpartition(-logprobs, kth=k - 1, axis=-1)[..., k:]  # (B, V - k)
    return mx.put_along_axis(logprobs, drop, mx.array(_NEG_INF, logprobs.dtype), axis=-1)


def apply_top_p(logprobs: mx.array, top_p: float) -> mx.array:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (renormalised first)."""
    if top_p >= 1:
        return logprobs
    probs = mx.softmax(logprobs.astype(mx.float32), axis=-1)  # earlier filters' -inf -> 0
    order = mx.argsort(-logprobs, axis=-1)  # (B, V), most likely first
    sorted_probs = mx.take_along_axis(probs, order, axis=-1)
    mass_before = mx.cumsum(sorted_probs, axis=-1, inclusive=False)
    keep_sorted = mass_before < top_p  # the first token always stays
    keep = mx.put_along_axis(mx.zeros_like(keep_sorted), order, keep_sorted, axis=-1)
    return mx.where(keep, logprobs, _NEG_INF)


def apply_min_p(logprobs: mx.array, min_p: float) -> mx.array:
    """Drop tokens less likely than min_p times the most likely one (the top token always stays)."""
    if min_p <= 0:
        return logprobs
    floor = mx.max(logprobs, axis=-1, keepdims=True) + math.log(min_p)  # (B, 1)
    return mx.where(logprobs < floor, _NEG_INF, logprobs)


def filter_logprobs(logprobs: mx.array, params: SamplingParams) -> mx.array:
    """top_k -> top_p -> min_p on (B, V); masked entries become -inf."""
    logprobs = apply_top_k(logprobs, params.top_k)
    logprobs = apply_top_p(logprobs, params.top_p)
    return apply_min_p(logprobs, params.min_p)


class Sampler:
    """One request's sampler: its params and its own PRNG key.

    The key is split on every draw, so a request's tokens depend only on its seed and its logits,
    never on what other requests in the batch (or mx.random's global state) drew meanwhile.
    """

    def __init__(self, params: SamplingParams):
        self.params = params
        # MLX keys take an unsigned 64-bit seed; fold negative or huge client seeds into that range.
        self.seed = secrets.randbits(64) if params.seed is None else params.seed % (1 << 64)
        self._key = mx.random.key(self.seed)

    def next_key(self) -> mx.array:
        self._key, sub = mx.random.split(self._key)
        return sub

    def __call__(self, logprobs: mx.array) -> mx.array:
        """logprobs (B, V) -> tokens (B,) uint32."""
        params = self.params
        if params.is_greedy:
            return mx.argmax(logprobs, axis=-1)
        filtered = filter_logprobs(logprobs, params)
        scaled = filtered * (1.0 / params.temperature)
        return mx.random.categorical(scaled, axis=-1, key=self.next_key())


def make_sampler(params: SamplingParams) -> Sampler:
    """A per-request sampler, callable as `sampler(logprobs (B, V)) -> tokens (B,)`."""
    return Sampler(params)


def sample_batch(samplers: Sequence[Sampler], logprobs: mx.array) -> mx.array:
    """Row i of logprobs (N, V) drawn by samplers[i] with its own key -> tokens (N,)."""
    if len(samplers) != logprobs.shape[0]:
        raise ValueError(f"{len(samplers)} samplers for {logprobs.shape[0]} rows")
    return mx.concatenate([s(logprobs[i : i + 1]) for i, s in enumerate(samplers)])
