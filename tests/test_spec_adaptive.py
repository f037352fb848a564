"""Adaptive speculation: k follows a request's recent acceptance, a request whose proposals keep
failing stops proposing (and probes again later), and a step cost that grows with the tokens in
the forward (a full, compute-bound batch) makes the engine propose less. No MLX in the pure part."""

from __future__ import annotations

import random

import pytest

from mlxrun.speculate import (
    EXPLORE_EVERY,
    PROBE_EVERY,
    Acceptance,
    NgramProposer,
    Payoff,
    PredictionProposer,
    expected_tokens,
    tokens_to_propose,
)

pytestmark = pytest.mark.pure


def test_expected_tokens_counts_the_bonus():
    assert expected_tokens(0.0, 5) == 1.0
    assert expected_tokens(1.0, 5) == 6.0
    assert expected_tokens(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)


def test_k_grows_with_acceptance_and_shrinks_with_cost():
    ks = [tokens_to_propose(a, 0.1, 8) for a in (0.05, 0.3, 0.6, 0.9, 0.99)]
    assert ks[0] == 0 and ks == sorted(ks) and ks[-1] == 8
    by_cost = [tokens_to_propose(0.8, t, 8) for t in (0.05, 0.3, 0.6, 0.9)]
    assert by_cost == sorted(by_cost, reverse=True) and by_cost[-1] == 0


def test_a_request_whose_proposals_fail_stops_and_probes_later():
    acc = Acceptance(prior=0.6)
    ks = []
    for _ in range(10):
        k = acc.k(0.1, 5)
        ks.append(k)
        if k:
            acc.update(k, 0)
    assert ks[0] == 5 and ks[-1] == 0
    waited = 1
    while acc.k(0.1, 5) == 0:
        waited += 1
    assert PROBE_EVERY - 10 <= waited <= PROBE_EVERY  # then one trial proposal
    acc.update(1, 0)  # the probe failed too: quiet again
    assert not any(acc.k(0.1, 5) for _ in range(PROBE_EVERY - 1))
    for _ in range(6):
        acc.update(5, 5)  # the output copies again
    assert acc.k(0.1, 5) == 5


def test_slower_speculative_steps_raise_the_bar_where_they_are_slower():
    pay = Payoff(prior=0.1)
    assert pay.threshold(16) == pay.threshold(1) == 0.1  # no data yet
    pay.observe(16, False, 16, 30.0)  # an idle gap before a step: one sample, not the median
    for _ in range(12):
        pay.observe(16, False, 16, 0.16)  # full batch, plain: 10 ms a token
        pay.observe(16, True, 40, 0.80)  # full batch, speculating: 20 ms a token
        pay.observe(1, False, 1, 0.05)  # alone, plain: 50 ms a token
        pay.observe(1, True, 4, 0.08)  # alone, speculating: 20 ms a token
    full, alone = pay.threshold(16), pay.threshold(1)
    assert full == 1.0 and alone == 0.1
    assert tokens_to_propose(0.9, alone, 5) == 5 and tokens_to_propose(0.99, full, 5) == 0
    for _ in range(40):  # the full batch's speculative steps got faster (better acceptance)
        pay.observe(16, True, 160, 0.8)
    assert pay.threshold(16) == pytest.approx(0.1)
    fresh = Payoff()
    explored = [fresh.explore(8) for _ in range(3 * EXPLORE_EVERY)]
    assert all(explored[:5])  # no plain step measured yet at this batch size
    for _ in range(3):
        fresh.observe(8, False, 8, 0.1)
    assert sum(fresh.explore(8) for _ in range(3 * EXPLORE_EVERY)) == 3


def test_a_prediction_resynchronises_after_an_edit():
    prediction = list(range(100, 140))
    proposer = PredictionProposer(prediction)
    assert proposer.propose([1], [], 4) == [100, 101, 102, 103]
    proposer.advance(4, 4, 104)
    assert proposer.propose([1], prediction[:5], 3) == [105, 106, 107]
    proposer.advance(3, 1, 999)  # the output changed here: 106 became 999
    output = prediction[:7] + [999, 7, 8]  # ...and went on with text the prediction lacks
    assert proposer.propose([1], output, 3) == []
    output += [110, 111]  # back on the predicted text
    assert proposer.propose([1], output, 3) == [112, 113, 114]


def test_ngram_lookup_copies_what_followed_the_last_tokens():
    prompt = [5, 6, 7, 8, 9, 10, 11, 5, 6]
    assert NgramProposer().propose(prompt, [7], 3) == [8, 9, 10]
    rng = random.Random(0)
    free = [rng.randrange(1000) for _ in range(50)]
    assert NgramProposer().propose(free, [], 3) == []
