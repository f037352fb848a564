"""Verifying one row's proposed tokens against the target model's logits (pure MLX, no model).

A row fed [t, x_1 .. x_k] in one forward pass; position j's logits predict the token after
x_j (x_0 = t). `verify_row` decides how many proposals to keep and draws the bonus token:

- greedy rows keep x_{j+1} while it is the argmax at position j, and the bonus is the argmax
  where they stopped: exactly the tokens plain decoding would have produced;
- sampled rows use rejection sampling (Leviathan et al. 2023; Chen et al. 2023): keep x_{j+1}
  with probability min(1, p_j(x) / q_j(x)); on the first rejection draw from
  norm(max(0, p_j - q_j)); if all k survive, draw the bonus from p_k. The output then follows p
  exactly, whatever the proposer. Deterministic proposers (n-gram, a prediction, a greedy draft)
  have q one-hot, so acceptance is p_j(x) and the residual is p_j with x removed.

p_j is what the row's Sampler would draw from: penalties over the history grown by the
proposals before j, then top_k / top_p / min_p, then temperature. Everything for all k + 1
positions is queued at once (bonus candidates included), so the caller syncs once for a batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx

from mlxrun.sampling import (
    SamplingParams,
    apply_penalties,
    compute_logprobs,
    filter_logprobs,
    token_logprobs,
    top_logprobs,
)


@dataclass
class Verdict:
    """Lazy results for one row: `accepted` () int32 and `candidates` (k + 1,) bonus tokens, one per
    stopping point; `logprobs` (k + 1, V) float32, the model's own distribution per position."""

    accepted: mx.array
    candidates: mx.array
    logprobs: mx.array


def position_logprobs(
    logits: mx.array, history: mx.array | None, proposal: Sequence[int], params: SamplingParams
) -> mx.array:
    """logits (k + 1, V) -> logprobs (k + 1, V) float32 after penalties; position j sees the
    history plus the first j proposals (as plain decoding would have)."""
    if not params.has_logits_processing:
        return compute_logprobs(logits)
    base = history if history is not None else mx.array([], dtype=mx.int32)
    rows = []
    for j in range(logits.shape[0]):
        seen = mx.concatenate([base, mx.array(list(proposal[:j]), dtype=mx.int32)])
        rows.append(apply_penalties(logits[j : j + 1], seen, params))
    return compute_logprobs(mx.concatenate(rows, axis=0))


def target_probs(logprobs: mx.array, params: SamplingParams) -> mx.array:
    """(n, V) -> (n, V): the distribution the row's Sampler draws from (filters, temperature)."""
    filtered = filter_logprobs(logprobs, params) * (1.0 / params.temperature)
    return mx.softmax(filtered, axis=-1)


def verify_row(
    logprobs: mx.array,
    proposal: Sequence[int],
    params: SamplingParams,
    key: mx.array | None = None,
    draft_probs: mx.array | None = None,
) -> Verdict:
    """logprobs (k + 1, V) of one row, k = len(proposal) >= 0. `draft_probs` (k, V) is the
    proposer's distribution q (None: deterministic, q one-hot). `key` is needed unless greedy."""
    k = len(proposal)
    x = mx.array(list(proposal), dtype=mx.int32)  # (k,)
    if params.is_greedy:
        best = mx.argmax(logprobs, axis=-1).astype(mx.int32)  # (k + 1,)
        ok = best[:k] == x
        return Verdict(_leading(ok), best, logprobs)
    assert key is not None, "a sampled row needs its key"
    accept_key, draw_key = mx.random.split(key)
    p = target_probs(logprobs, params)  # (k + 1, V)
    if k:
        px = mx.take_along_axis(p[:k], x[:, None], axis=-1)[:, 0]  # (k,)
        if draft_probs is None:
            q = mx.zeros_like(p[:k]).at[mx.arange(k), x].add(1.0)  # one-hot
            ratio = px
        else:
            q = draft_probs.astype(mx.float32)
            qx = mx.take_along_axis(q, x[:, None], axis=-1)[:, 0]
            ratio = px / mx.maximum(qx, 1e-30)
        u = mx.random.uniform(shape=(k,), key=accept_key)
        ok = u < mx.minimum(ratio, 1.0)
        residual = mx.maximum(p[:k] - q, 0.0)
        # p == q leaves nothing: a rejection there has probability 0, any draw will do.
        residual = mx.where(residual.sum(-1, keepdims=True) > 0, residual, p[:k])
        dist = mx.concatenate([residual, p[k:]], axis=0)  # (k + 1, V)
    else:
        ok, dist = mx.zeros((0,), dtype=mx.bool_), p
    candidates = mx.random.categorical(mx.log(dist), axis=-1, key=draw_key).astype(mx.int32)
    return Verdict(_leading(ok), candidates, logprobs)


def _leading(ok: mx.array) -> mx.array:
    """How many leading entries are True: (k,) bool -> () int32."""
    if ok.size == 0:
        return mx.array(0, dtype=mx.int32)
    return mx.cumprod(ok.astype(mx.int32)).sum().astype(mx.int32)


def token_extras(logprobs: mx.array, tokens: Sequence[int], top: int) -> list[tuple[mx.array, ...]]:
    """For tokens[j] drawn at position j: (logprob (1,), top ids (1, n), top lps (1, n)), the
    shape mlxrun.batch.sample_rows gives the engine."""
    rows = logprobs[: len(tokens)]
    chosen = token_logprobs(rows, mx.array(list(tokens), dtype=mx.int32))  # (n,)
    ids, values = top_logprobs(rows, top)
    return [(chosen[j : j + 1], ids[j : j + 1], values[j : j + 1]) for j in range(len(tokens))]
