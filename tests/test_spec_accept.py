"""Verification of proposed tokens, on a fake model over a 3-token vocabulary: greedy keeps
exactly what argmax decoding would produce, and rejection sampling leaves the output
distribution unchanged (a chi-square test against the exact distribution of 3-token outputs)."""

from __future__ import annotations

import itertools
import math
import zlib

import mlx.core as mx
import numpy as np
import pytest

from mlxrun.sampling import SamplingParams, apply_penalties, compute_logprobs
from mlxrun.spec_accept import position_logprobs, target_probs, verify_row

pytestmark = pytest.mark.pure

V, L, SAMPLES = 3, 3, 3000


def fake_logits(prefix: list[int]) -> np.ndarray:
    """A fixed, prefix-dependent next-token distribution (the 'target model')."""
    rng = np.random.default_rng(zlib.crc32(bytes(prefix)))
    return (rng.normal(size=V) * 1.5).astype(np.float32)


def exact_probs(prefix: list[int], params: SamplingParams) -> np.ndarray:
    """What plain decoding draws from after `prefix` (penalties over the output so far)."""
    logits = apply_penalties(mx.array(fake_logits(prefix))[None], prefix, params)
    return np.array(target_probs(compute_logprobs(logits), params))[0]


def draft_probs(prefix: list[int]) -> np.ndarray:
    """A proposer's distribution that differs from the target's."""
    rng = np.random.default_rng(zlib.crc32(bytes(prefix)) + 7)
    p = rng.dirichlet(np.ones(V))
    return p / p.sum()


def speculate_once(prefix, params, rng, key, use_q: bool):
    """One verify of 2 proposals after `prefix`; returns the tokens it yields."""
    if use_q:
        proposal, qs = [], []
        for _ in range(2):
            q = draft_probs(prefix + proposal)
            proposal.append(int(rng.choice(V, p=q)))
            qs.append(q)
        q_arr = mx.array(np.stack(qs), dtype=mx.float32)
    else:  # a deterministic proposer (a greedy draft): q is one-hot
        proposal, q_arr = [], None
        for _ in range(2):
            proposal.append(int(np.argmax(draft_probs(prefix + proposal))))
    logits = mx.array(np.stack([fake_logits(prefix + proposal[:j]) for j in range(3)]))
    history = mx.array(prefix, dtype=mx.int32)
    lp = position_logprobs(logits, history, proposal, params)
    verdict = verify_row(lp, proposal, params, key, q_arr)
    a = int(verdict.accepted.item())
    return proposal[:a] + [int(verdict.candidates[a].item())]


def chi2_limit(df: int, z: float = 3.09) -> float:
    """The 0.999 quantile of chi-square(df) (Wilson-Hilferty)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.8, top_p=0.95),
        SamplingParams(temperature=1.0, presence_penalty=1.5),
    ],
    ids=["temperature_top_p", "presence_penalty"],
)
@pytest.mark.parametrize("use_q", [False, True], ids=["one_hot_q", "draft_q"])
def test_rejection_sampling_leaves_the_output_distribution_unchanged(params, use_q):
    rng, key = np.random.default_rng(1), mx.random.key(2)
    counts: dict[tuple, int] = {}
    for _ in range(SAMPLES):
        out: list[int] = []
        while len(out) < L:
            key, sub = mx.random.split(key)
            out += speculate_once(out, params, rng, sub, use_q)
        counts[tuple(out[:L])] = counts.get(tuple(out[:L]), 0) + 1
    expected = {}
    for seq in itertools.product(range(V), repeat=L):
        p = 1.0
        for i, t in enumerate(seq):
            p *= exact_probs(list(seq[:i]), params)[t]
        expected[seq] = p * SAMPLES
    observed = np.array([counts.get(s, 0) for s in expected])
    exp = np.array(list(expected.values()))
    keep = exp >= 5  # pool the rare outcomes into one bin
    obs_b = np.append(observed[keep], observed[~keep].sum())
    exp_b = np.append(exp[keep], exp[~keep].sum())
    nz = exp_b > 0
    stat = float((((obs_b - exp_b) ** 2)[nz] / exp_b[nz]).sum())
    assert observed.sum() == SAMPLES
    assert stat < chi2_limit(int(nz.sum()) - 1), (stat, observed, exp.round(1))


def test_greedy_keeps_the_argmax_prefix_and_the_bonus_is_the_next_argmax():
    params = SamplingParams(temperature=0)
    prefix = [0]
    plain = []
    for _ in range(4):
        plain.append(int(np.argmax(fake_logits(prefix + plain))))
    wrong = (plain[2] + 1) % V
    proposal = plain[:2] + [wrong]
    logits = mx.array(np.stack([fake_logits(prefix + proposal[:j]) for j in range(4)]))
    verdict = verify_row(position_logprobs(logits, None, proposal, params), proposal, params)
    a = int(verdict.accepted.item())
    assert a == 2
    assert proposal[:a] + [int(verdict.candidates[a].item())] == plain[:3]


def test_a_penalised_position_sees_the_proposals_before_it():
    params = SamplingParams(temperature=0, presence_penalty=2.0)
    logits = mx.zeros((3, V))
    lp = np.array(position_logprobs(logits, mx.array([0], dtype=mx.int32), [1, 2], params))
    assert np.argmax(lp[0]) in (1, 2)  # token 0 is penalised at every position
    assert lp[1, 1] < lp[1, 2] and lp[2, 0] == lp[2, 1] == lp[2, 2]
