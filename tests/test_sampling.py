"""Pure tier: SamplingParams validation, logits processors and samplers on hand-made logits."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from mlxrun.errors import InvalidRequestError
from mlxrun.sampling import (
    Sampler,
    SamplingParams,
    apply_min_p,
    apply_penalties,
    apply_top_k,
    apply_top_p,
    compute_logprobs,
    make_logits_processors,
    make_sampler,
    sample_batch,
    token_logprobs,
    top_logprobs,
)

pytestmark = pytest.mark.pure

DRAWS = 2000  # rows drawn in one call: one categorical over (DRAWS, V)


def logprobs_of(probs: list[float], rows: int = 1) -> mx.array:
    row = mx.log(mx.array(probs, dtype=mx.float32))
    return mx.broadcast_to(row, (rows, len(probs)))


def support(tokens: mx.array) -> set[int]:
    return set(np.array(tokens).tolist())


def draw(params: SamplingParams, logprobs: mx.array) -> mx.array:
    tokens = Sampler(params)(logprobs)
    mx.eval(tokens)
    return tokens


# ---------------------------------------------------------------- validation

INVALID = [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.1}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"min_p": -0.1}, "min_p"),
    ({"min_p": 1.5}, "min_p"),
    ({"seed": "42"}, "seed"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty"),
    ({"repetition_context_size": 0}, "repetition_context_size"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -2.01}, "frequency_penalty"),
    ({"logit_bias": {5: 101.0}}, "logit_bias"),
    ({"logit_bias": {5: -100.5}}, "logit_bias"),
    ({"logit_bias": {"5": 1.0}}, "logit_bias"),
    ({"logit_bias": {-1: 1.0}}, "logit_bias"),
    ({"logit_bias": {5: "big"}}, "logit_bias"),
    ({"logit_bias": [1, 2]}, "logit_bias"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"stop": [1]}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"stop": [f"s{i}" for i in range(17)]}, "stop"),
    ({"stop": 7}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"stop_token_ids": ["2"]}, "stop_token_ids"),
    ({"logprobs": "yes"}, "logprobs"),
    ({"ignore_eos": 1}, "ignore_eos"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ({"top_logprobs": 3}, "top_logprobs"),  # alternatives without logprobs
]


@pytest.mark.parametrize(("kwargs", "param"), INVALID)
def test_invalid_values_name_their_field(kwargs: dict, param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**kwargs)
    assert info.value.param == param
    assert param in info.value.message


def test_defaults_are_openai_like() -> None:
    p = SamplingParams()
    assert (p.temperature, p.top_p, p.top_k, p.min_p) == (1.0, 1.0, 0, 0.0)
    assert (p.repetition_penalty, p.repetition_context_size) == (1.0, 64)
    assert not p.is_greedy and not p.has_logits_processing
    assert SamplingParams(temperature=0).is_greedy and SamplingParams(top_k=1).is_greedy


def test_edge_values_are_accepted_and_containers_normalised() -> None:
    bias = {3: 100, 4: -100.0}
    p = SamplingParams(
        temperature=0, top_p=1, min_p=1, presence_penalty=-2, frequency_penalty=2,
        logit_bias=bias, stop="###", stop_token_ids=[2, 7], seed=-5, max_tokens=1,
        logprobs=True, top_logprobs=20,
    )  # fmt: skip
    assert p.stop == ("###",) and p.stop_token_ids == (2, 7)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(stop=[f"s{i}" for i in range(16)]).stop[-1] == "s15"
    bias[5] = 1.0  # the params keep their own copy
    assert 5 not in p.logit_bias
    assert hash(p) == hash(p.replace())  # usable as a dict key despite the bias dict
    with pytest.raises(AttributeError):
        p.temperature = 1.0  # type: ignore[misc]


def test_replace_validates_again() -> None:
    p = SamplingParams(temperature=0.7)
    assert p.replace(top_k=5).top_k == 5 and p.replace(top_k=5).temperature == 0.7
    with pytest.raises(InvalidRequestError) as info:
        p.replace(top_p=2.0)
    assert info.value.param == "top_p"


def test_logit_bias_ids_outside_the_vocab_are_rejected() -> None:
    p = SamplingParams(logit_bias={9: 1.0})
    assert p.check_vocab(10) is p
    with pytest.raises(InvalidRequestError) as info:
        p.check_vocab(9)
    assert info.value.param == "logit_bias"
    with pytest.raises(InvalidRequestError):
        apply_penalties(mx.zeros((1, 9)), [], p)


# ---------------------------------------------------------------- filters and sampling


def test_greedy_picks_argmax_per_row() -> None:
    logits = mx.array([[0.1, 3.0, -1.0, 2.9], [5.0, 0.0, 0.0, 0.0], [-2.0, -1.0, -3.0, -0.5]])
    lp = compute_logprobs(logits)
    for params in (SamplingParams(temperature=0), SamplingParams(top_k=1, temperature=1.5)):
        assert np.array(Sampler(params)(lp)).tolist() == [1, 0, 3]


def test_top_k_restricts_support() -> None:
    probs = [0.05, 0.2, 0.1, 0.3, 0.05, 0.25, 0.03, 0.02]
    masked = np.array(apply_top_k(logprobs_of(probs), 3))
    assert np.isfinite(masked[0]).nonzero()[0].tolist() == [1, 3, 5]
    tokens = draw(SamplingParams(top_k=3, seed=1), logprobs_of(probs, DRAWS))
    assert support(tokens) == {1, 3, 5}


@pytest.mark.parametrize(
    ("top_p", "kept"), [(0.45, {0}), (0.6, {0, 1}), (0.9, {0, 1, 2}), (0.99, {0, 1, 2, 3})]
)
def test_top_p_keeps_the_minimal_nucleus(top_p: float, kept: set[int]) -> None:
    probs = [0.5, 0.3, 0.15, 0.05]
    masked = np.array(apply_top_p(logprobs_of(probs), top_p))
    assert set(np.isfinite(masked[0]).nonzero()[0].tolist()) == kept
    assert support(draw(SamplingParams(top_p=top_p, seed=2), logprobs_of(probs, DRAWS))) == kept


def test_top_p_handles_unsorted_rows_independently() -> None:
    lp = mx.log(mx.array([[0.05, 0.15, 0.3, 0.5], [0.3, 0.5, 0.05, 0.15]]))
    finite = np.isfinite(np.array(apply_top_p(lp, 0.6)))
    assert finite.tolist() == [[False, False, True, True], [True, True, False, False]]


def test_top_p_renormalises_after_top_k() -> None:
    # After top_k=2 the survivors weigh 4/7 and 3/7, so top_p=0.5 keeps only the first.
    probs = [0.4, 0.3, 0.2, 0.1]
    tokens = draw(SamplingParams(top_k=2, top_p=0.5, seed=3), logprobs_of(probs, DRAWS))
    assert support(tokens) == {0}
    tokens = draw(SamplingParams(top_k=2, top_p=0.6, seed=3), logprobs_of(probs, DRAWS))
    assert support(tokens) == {0, 1}


@pytest.mark.parametrize(("min_p", "kept"), [(0.2, {0, 1, 2}), (0.5, {0, 1}), (1.0, {0})])
def test_min_p_scales_with_the_top_token(min_p: float, kept: set[int]) -> None:
    probs = [0.5, 0.3, 0.15, 0.05]
    masked = np.array(apply_min_p(logprobs_of(probs), min_p))
    assert set(np.isfinite(masked[0]).nonzero()[0].tolist()) == kept
    assert support(draw(SamplingParams(min_p=min_p, seed=4), logprobs_of(probs, DRAWS))) == kept


def test_filters_see_the_untempered_distribution() -> None:
    # Tempered by 5 the last token would pass min_p=0.2 ((0.05/0.5) ** 0.2 = 0.63); untempered it doesn't.
    probs = [0.5, 0.3, 0.15, 0.05]
    tokens = draw(SamplingParams(min_p=0.2, temperature=5.0, seed=5), logprobs_of(probs, DRAWS))
    assert support(tokens) == {0, 1, 2}


def test_lower_temperature_concentrates_mass() -> None:
    logits = mx.array([2.0, 1.0, 0.0, -1.0])
    lp = mx.broadcast_to(compute_logprobs(logits[None]), (4000, 4))
    share = {}
    for temp in (0.5, 1.5):
        tokens = np.array(draw(SamplingParams(temperature=temp, seed=6), lp))
        share[temp] = float((tokens == 0).mean())
        expected = math.exp(2 / temp) / sum(math.exp(x / temp) for x in (2, 1, 0, -1))
        assert abs(share[temp] - expected) < 0.04
    assert share[0.5] > 0.8 > 0.6 > share[1.5]


# ---------------------------------------------------------------- penalties and bias

LOGITS = [[2.0, -1.0, 0.5, -3.0, 1.0], [-2.0, 4.0, 0.0, 1.0, -1.0]]
HISTORY = [0, 1, 1, 4]


def test_repetition_penalty_divides_positive_and_multiplies_negative() -> None:
    out = apply_penalties(mx.array(LOGITS), HISTORY, SamplingParams(repetition_penalty=2.0))
    expected = [[1.0, -2.0, 0.5, -3.0, 0.5], [-4.0, 2.0, 0.0, 1.0, -2.0]]
    np.testing.assert_allclose(np.array(out), expected)


def test_repetition_penalty_only_looks_at_its_window() -> None:
    p = SamplingParams(repetition_penalty=2.0, repetition_context_size=2)  # sees ids 1 and 4
    out = apply_penalties(mx.array(LOGITS), mx.array(HISTORY), p)
    expected = [[2.0, -2.0, 0.5, -3.0, 0.5], [-2.0, 2.0, 0.0, 1.0, -2.0]]
    np.testing.assert_allclose(np.array(out), expected)


def test_presence_and_frequency_penalties_follow_openai() -> None:
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(mx.array(LOGITS), HISTORY, p)
    delta = [0.75, 1.0, 0.0, 0.0, 0.75]  # counts 1, 2, 0, 0, 1 -> 0.25 * c + 0.5 * (c > 0)
    np.testing.assert_allclose(np.array(out), np.array(LOGITS) - np.array(delta))
    negative = SamplingParams(presence_penalty=-1.0)  # negative values encourage repeats
    out = apply_penalties(mx.array(LOGITS), HISTORY, negative)
    np.testing.assert_allclose(np.array(out), np.array(LOGITS) + np.array([1, 1, 0, 0, 1]))


def test_penalties_compose_then_bias_is_added_last() -> None:
    p = SamplingParams(repetition_penalty=2.0, frequency_penalty=1.0, logit_bias={0: 3.0, 2: -1.5})
    logits = mx.array(LOGITS)
    out = apply_penalties(logits, HISTORY, p)
    expected = [[1.0 - 1 + 3, -2.0 - 2, 0.5 - 1.5, -3.0, 0.5 - 1],
                [-4.0 - 1 + 3, 2.0 - 2, 0.0 - 1.5, 1.0, -2.0 - 1]]  # fmt: skip
    np.testing.assert_allclose(np.array(out), expected)
    np.testing.assert_allclose(np.array(logits), LOGITS)  # the input is untouched
    empty = apply_penalties(logits, [], p)  # no history: only the bias applies
    np.testing.assert_allclose(np.array(empty), np.array(LOGITS) + [3, 0, -1.5, 0, 0])


def test_penalties_keep_dtype_and_are_a_no_op_by_default() -> None:
    logits = mx.array(LOGITS, dtype=mx.bfloat16)
    assert apply_penalties(logits, HISTORY, SamplingParams()) is logits
    out = apply_penalties(logits, HISTORY, SamplingParams(repetition_penalty=2.0))
    assert out.dtype == mx.bfloat16 and out.shape == (2, 5)


def test_make_logits_processors_matches_apply_penalties() -> None:
    assert make_logits_processors(SamplingParams()) == []
    p = SamplingParams(frequency_penalty=0.5, logit_bias={3: 2.0})
    (proc,) = make_logits_processors(p)
    got = proc(mx.array(HISTORY), mx.array(LOGITS))
    np.testing.assert_allclose(
        np.array(got), np.array(apply_penalties(mx.array(LOGITS), HISTORY, p))
    )


def test_logit_bias_bans_and_forces_tokens() -> None:
    logits = mx.broadcast_to(mx.array([[0.0, 0.0, 10.0, -20.0]]), (DRAWS, 4))
    banned = SamplingParams(logit_bias={2: -100}, seed=7)
    tokens = draw(banned, compute_logprobs(apply_penalties(logits, [], banned)))
    assert 2 not in support(tokens) and support(tokens) == {0, 1}
    forced = SamplingParams(logit_bias={3: 100}, seed=7)
    tokens = draw(forced, compute_logprobs(apply_penalties(logits, [], forced)))
    assert support(tokens) == {3}


# ---------------------------------------------------------------- seeds and independence


def run(sampler: Sampler, steps: int = 40, vocab: int = 1000) -> list[int]:
    lp = compute_logprobs(mx.zeros((1, vocab)) + mx.arange(vocab) * 1e-3)  # near-uniform
    return [int(sampler(lp).item()) for _ in range(steps)]


def test_same_seed_same_tokens_different_seed_different_tokens() -> None:
    params = SamplingParams(seed=1234, top_p=0.95)
    first = run(make_sampler(params))
    assert run(make_sampler(params)) == first
    assert run(make_sampler(params.replace(seed=1235))) != first
    assert len(set(first)) > 30  # the draws really vary from step to step


def test_unseeded_samplers_draw_their_own_seeds() -> None:
    a, b = Sampler(SamplingParams()), Sampler(SamplingParams())
    assert a.seed != b.seed and 0 <= a.seed < 1 << 64
    assert run(a) != run(b)
    assert Sampler(SamplingParams(seed=-1)).seed == (1 << 64) - 1


def test_a_request_draws_the_same_whatever_runs_beside_it() -> None:
    alone = run(Sampler(SamplingParams(seed=99)))
    a, b = Sampler(SamplingParams(seed=99)), Sampler(SamplingParams(seed=99, temperature=0.7))
    lp = compute_logprobs(mx.arange(1000)[None] * 1e-3)
    interleaved = []
    for _ in range(40):
        b(lp)
        mx.random.uniform(shape=(3,))  # the global PRNG moves too
        interleaved.append(int(a(lp).item()))
    assert interleaved == alone


def test_sample_batch_gives_each_row_its_own_sampler() -> None:
    lp = compute_logprobs(mx.arange(1000)[None] * 1e-3)
    seeds = [11, 12, 13]
    solo = [run(Sampler(SamplingParams(seed=s)), steps=10) for s in seeds]
    samplers = [Sampler(SamplingParams(seed=s)) for s in seeds]
    greedy = Sampler(SamplingParams(temperature=0))
    batched = [sample_batch(samplers + [greedy], mx.concatenate([lp] * 4)) for _ in range(10)]
    rows = np.array([np.array(t) for t in batched]).T
    assert rows[:3].tolist() == solo
    assert rows[3].tolist() == [999] * 10
    with pytest.raises(ValueError):
        sample_batch(samplers, lp)


# ---------------------------------------------------------------- logprobs


def test_logprobs_are_float32_and_sum_to_one() -> None:
    logits = mx.array([[1.0, 2.0, 3.0, -50.0], [0.0, 0.0, 0.0, 0.0]], dtype=mx.bfloat16)
    lp = compute_logprobs(logits)
    assert lp.dtype == mx.float32
    np.testing.assert_allclose(np.exp(np.array(lp)).sum(axis=-1), [1.0, 1.0], rtol=1e-6)
    row = np.array([1.0, 2.0, 3.0, -50.0])
    reference = row - np.log(np.exp(row).sum())
    np.testing.assert_allclose(np.array(lp)[0], reference, rtol=1e-5)


def test_top_logprobs_are_sorted_and_correct() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 50)).astype(np.float32)
    lp = compute_logprobs(mx.array(logits))
    ids, values = top_logprobs(lp, 5)
    assert ids.shape == (3, 5) and values.shape == (3, 5) and ids.dtype == mx.int32
    ref = np.argsort(-logits, axis=-1)[:, :5]
    assert np.array(ids).tolist() == ref.tolist()
    np.testing.assert_allclose(np.array(values), np.take_along_axis(np.array(lp), ref, axis=-1))
    assert (np.diff(np.array(values), axis=-1) <= 0).all()
    ids, values = top_logprobs(lp, 80)  # more than the vocabulary: all of it, sorted
    assert ids.shape == (3, 50) and sorted(np.array(ids)[0].tolist()) == list(range(50))
    assert top_logprobs(lp, 0)[0].shape == (3, 0)


def test_token_logprobs_picks_each_rows_token() -> None:
    lp = compute_logprobs(mx.array([[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]]))
    got = token_logprobs(lp, mx.array([2, 1], dtype=mx.uint32))
    np.testing.assert_allclose(np.array(got), [np.array(lp)[0, 2], np.array(lp)[1, 1]])
