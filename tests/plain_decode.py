"""The textbook greedy loop, for tests: one sequence, its own KV cache, no batching, no pipelining,
no prefix cache. It is the arithmetic the retired single-sequence loop of mlxrun.generate did, kept
as an independent reference for the engine (which generate and chat now run on)."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from mlxrun import models
from mlxrun.sampling import SamplingParams, apply_penalties, compute_logprobs


@dataclass(frozen=True)
class Step:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # the 5 most likely (id, logprob), most likely first


def plain_greedy(
    model, prompt_ids: list[int], params: SamplingParams, eos_ids: tuple[int, ...] = ()
) -> list[Step]:
    """Greedy tokens for prompt_ids under params (penalties and logit_bias applied): max_tokens of
    them, or fewer when a stop token or EOS (unless ignore_eos) comes; that token is not listed."""
    assert params.is_greedy and params.max_tokens is not None
    stop = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids))
    cache = models.make_cache(model)
    logits = model(mx.array(prompt_ids)[None], cache=cache)[:, -1, :]  # (1, V)
    out: list[Step] = []
    while len(out) < params.max_tokens:
        history = mx.array([s.token_id for s in out], dtype=mx.int32)
        logprobs = compute_logprobs(apply_penalties(logits, history, params))[0]  # (V,)
        token = int(mx.argmax(logprobs).item())
        if token in stop:
            break
        order = mx.argsort(-logprobs)[:5].tolist()
        top = tuple((int(i), float(logprobs[i].item())) for i in order)
        out.append(Step(token, float(logprobs[token].item()), top))
        logits = model(mx.array([[token]]), cache=cache)[:, -1, :]
    return out
