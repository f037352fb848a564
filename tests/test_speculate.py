"""Speculation inside the batch on a tiny model: KV rollback is exact, greedy output is
token-identical to plain decoding (predictions with edits, n-gram lookup, quantized KV), and
stop tokens, logprobs, penalties, grammars and abort keep working with speculation on."""

from __future__ import annotations

import random

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import BatchKVCache, KVCache

from mlxrun.engine import Engine, EngineConfig, Event, Request
from mlxrun.sampling import SamplingParams
from mlxrun.spec_step import SpecConfig, can_rollback, rollback
from mlxrun.speculate import PROBE_EVERY

pytestmark = pytest.mark.model

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
ALWAYS = SpecConfig(mode="ngram", adaptive=False, max_k=4)


@pytest.fixture(scope="module")
def lm(checkpoint_factory):
    from mlxrun.loader import load

    return load(str(checkpoint_factory("llama")))


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, 400) for _ in range(rng.randrange(4, 30))] for _ in range(n)]


def _engine(lm, spec: SpecConfig | None = None, **kw) -> Engine:
    cfg = EngineConfig(
        eos_token_ids=lm[2].eos_token_ids,
        cache_memory_bytes=0,
        speculate=spec or SpecConfig(),
        **kw,
    )
    return Engine(lm[0], cfg).start()


def _run(engine: Engine, requests: list[Request]) -> dict[str, list[Event]]:
    streams = [engine.submit_sync(r) for r in requests]
    return {s.id: list(s) for s in streams}


def _tokens(events: list[Event]) -> list[int]:
    return [t for e in events for t in e.new_token_ids]


def _plain(lm, prompts, params=GREEDY, **kw) -> list[list[Event]]:
    with _engine(lm, **kw) as engine:
        out = _run(engine, [Request(f"r{i}", p, params) for i, p in enumerate(prompts)])
    return [out[f"r{i}"] for i in range(len(prompts))]


def _edited(tokens: list[int], every: int, seed: int = 0) -> list[int]:
    """A prediction that differs from the real output at every `every`-th token."""
    rng = random.Random(seed)
    return [rng.randrange(10, 400) if i % every == every - 1 else t for i, t in enumerate(tokens)]


# ------------------------------------------------------------------ KV rollback


def _prefill(model, prompt):
    cache = [KVCache() for _ in model.layers]
    model(mx.array(prompt)[None], cache=cache)
    return cache


def test_rollback_leaves_the_cache_as_plain_decoding_would(lm):
    model = lm[0]
    prompts = [[5, 9, 33, 71, 2, 8, 100], [40, 41]]
    feeds = [[7, 11, 12, 13], [9, 30, 31, 32]]  # [fed token] + 3 proposals per row
    kept = [2, 0]  # row 0 keeps 2 proposals, row 1 none
    caches = [_prefill(model, p) for p in prompts]
    batch = [BatchKVCache.merge(list(layer)) for layer in zip(*caches, strict=True)]
    assert can_rollback(batch)
    model(mx.array(feeds), cache=batch)
    rollback(batch, [3 - k for k in kept])
    for i, prompt in enumerate(prompts):
        plain = _prefill(model, prompt)
        for t in feeds[i][: 1 + kept[i]]:  # plain decoding: one token at a time
            model(mx.array([[t]]), cache=plain)
        for layer, ref in zip(batch, plain, strict=True):
            got = layer.extract(i)
            assert got.offset == ref.offset == len(prompt) + 1 + kept[i]
            np.testing.assert_allclose(got.keys, ref.keys[..., : ref.offset, :], atol=1e-5)
            np.testing.assert_allclose(got.values, ref.values[..., : ref.offset, :], atol=1e-5)
    # The next step reads exactly the kept positions: same logits as the plain caches give.
    nxt = model(mx.array([[3], [4]]), cache=batch)[:, -1]
    for i, prompt in enumerate(prompts):
        plain = _prefill(model, prompt)
        for t in feeds[i][: 1 + kept[i]] + [[3], [4]][i]:
            ref = model(mx.array([[t]]), cache=plain)[:, -1]
        np.testing.assert_allclose(nxt[i], ref[0], atol=1e-4)


# ------------------------------------------------------------------ exactness


@pytest.mark.parametrize("kv_bits", [None, 8])
def test_greedy_predictions_with_edits_are_token_identical_to_plain_decoding(lm, kv_bits):
    prompts = _prompts(6)
    plain = [_tokens(e) for e in _plain(lm, prompts, kv_bits=kv_bits)]
    with _engine(lm, kv_bits=kv_bits) as engine:
        requests = [
            Request(f"r{i}", p, GREEDY, prediction=_edited(plain[i], 5 + i))
            for i, p in enumerate(prompts)
        ]
        out = _run(engine, requests)
        stats = engine.stats()
    assert [_tokens(out[f"r{i}"]) for i in range(6)] == plain
    last = [out[f"r{i}"][-1] for i in range(6)]
    assert all(e.accepted_prediction_tokens > 0 and e.rejected_prediction_tokens > 0 for e in last)
    assert 0 < stats["spec_acceptance_rate"] < 1
    assert stats["spec_tokens_per_row_step"] > 1.5


def test_an_exact_prediction_is_accepted_whole_in_fewer_steps(lm):
    prompts = _prompts(3, seed=1)
    plain = _plain(lm, prompts)
    with _engine(lm) as engine:
        requests = [
            Request(f"r{i}", p, GREEDY, prediction=_tokens(plain[i])) for i, p in enumerate(prompts)
        ]
        out = _run(engine, requests)
    for i in range(3):
        assert _tokens(out[f"r{i}"]) == _tokens(plain[i])
        assert out[f"r{i}"][-1].accepted_prediction_tokens == len(_tokens(plain[i]))
        assert out[f"r{i}"][-1].rejected_prediction_tokens == 0
        assert out[f"r{i}"][-1].step < plain[i][-1].step / 2


def test_ngram_lookup_is_token_identical_and_proposes(lm):
    prompts = _prompts(5, seed=2)
    plain = [_tokens(e) for e in _plain(lm, prompts)]
    with _engine(lm, ALWAYS) as engine:
        out = _run(engine, [Request(f"r{i}", p, GREEDY) for i, p in enumerate(prompts)])
        stats = engine.stats()
    assert [_tokens(out[f"r{i}"]) for i in range(5)] == plain
    assert stats["spec_accepted_tokens"] > 0 and stats["spec_steps"] > 0


# ------------------------------------------------------------------ what keeps working


def test_stop_tokens_and_budgets_cut_accepted_proposals(lm):
    prompts = _prompts(4, seed=3)
    plain = [_tokens(e) for e in _plain(lm, prompts)]
    stops = [p[7] for p in plain]  # a token the output reaches mid-way
    reqs = [
        Request(f"r{i}", p, GREEDY.replace(stop_token_ids=(stops[i],), max_tokens=24 - i))
        for i, p in enumerate(prompts)
    ]
    with _engine(lm) as engine:
        expected = _run(engine, reqs)
    with _engine(lm) as engine:
        predicted = [
            Request(r.id, r.prompt_token_ids, r.params, prediction=plain[i])
            for i, r in enumerate(reqs)
        ]
        out = _run(engine, predicted)
    for r in reqs:
        assert _tokens(out[r.id]) == _tokens(expected[r.id])
        assert out[r.id][-1].finish_reason == expected[r.id][-1].finish_reason == "stop"
        assert stops[int(r.id[1:])] not in _tokens(out[r.id])


def test_logprobs_and_penalties_match_plain_decoding(lm):
    prompts = _prompts(4, seed=4)
    params = GREEDY.replace(
        logprobs=True, top_logprobs=3, presence_penalty=0.7, frequency_penalty=0.3,
        repetition_penalty=1.2, logit_bias={17: 2.0},
    )  # fmt: skip
    plain = _plain(lm, prompts, params)
    with _engine(lm, ALWAYS) as engine:
        reqs = [
            Request(f"r{i}", p, params, prediction=_edited(_tokens(plain[i]), 4))
            for i, p in enumerate(prompts)
        ]
        out = _run(engine, reqs)
        assert engine.stats()["spec_accepted_tokens"] > 0
    for i in range(4):
        assert _tokens(out[f"r{i}"]) == _tokens(plain[i])
        got = [lp for e in out[f"r{i}"] for lp in e.logprobs or []]
        ref = [lp for e in plain[i] for lp in e.logprobs or []]
        assert len(got) == len(ref) == len(_tokens(plain[i]))
        for g, r in zip(got, ref, strict=True):
            assert g.token_id == r.token_id and abs(g.logprob - r.logprob) < 1e-4
            assert [t for t, _ in g.top] == [t for t, _ in r.top]


def test_a_constrained_row_beside_speculating_rows_samples_as_without_them(lm):
    from mlxrun.constrain import GrammarCompiler

    compiler = GrammarCompiler(lm[1])
    prompts = _prompts(3, seed=5)
    sampled = SamplingParams(temperature=1.0, seed=11, max_tokens=40)

    def run(spec):
        with _engine(lm, spec) as engine:
            reqs = [Request(f"u{i}", p, GREEDY) for i, p in enumerate(prompts)]
            reqs.append(Request("c", [5, 17, 99], sampled, constraint=compiler.json_object("r")))
            return _run(engine, reqs), engine.stats()

    plain, _ = run(SpecConfig())
    spec, stats = run(ALWAYS)
    assert stats["spec_steps"] > 0
    assert _tokens(spec["c"]) == _tokens(plain["c"])
    for i in range(3):
        assert _tokens(spec[f"u{i}"]) == _tokens(plain[f"u{i}"])


def test_abort_ends_a_speculating_request_and_the_others_go_on(lm):
    prompts = _prompts(3, seed=6)
    long = GREEDY.replace(max_tokens=200)
    plain = [_tokens(e) for e in _plain(lm, prompts, long)]
    with _engine(lm, ALWAYS) as engine:
        streams = [
            engine.submit_sync(Request(f"r{i}", p, long, prediction=plain[i]))
            for i, p in enumerate(prompts)
        ]
        first = next(iter(streams[0]))
        engine.abort("r0")
        rest = list(streams[0])
        others = [list(s) for s in streams[1:]]
    assert first.new_token_ids and rest[-1].finish_reason == "abort"
    assert len(_tokens([first, *rest])) < 200
    assert [_tokens(o) for o in others] == plain[1:]


def test_a_request_whose_prediction_keeps_failing_stops_speculating(lm):
    prompts = _prompts(2, seed=7)
    long = GREEDY.replace(max_tokens=80)
    plain = [_tokens(e) for e in _plain(lm, prompts, long)]
    garbage = _edited(plain[1], 2)  # every other token wrong: proposals keep failing

    def run(spec):
        with _engine(lm, spec) as engine:
            reqs = [
                Request("good", prompts[0], long, prediction=plain[0]),
                Request("bad", prompts[1], long, prediction=garbage),
            ]
            return _run(engine, reqs)

    adaptive = run(SpecConfig(adaptive=True, threshold=0.1))  # acceptance alone decides
    always = run(SpecConfig(adaptive=False))
    for out in (adaptive, always):
        assert [_tokens(out["good"]), _tokens(out["bad"])] == plain
    bad, bad_always = adaptive["bad"][-1], always["bad"][-1]
    assert bad_always.rejected_prediction_tokens > 200
    assert bad.rejected_prediction_tokens < bad_always.rejected_prediction_tokens / 3
    # It stopped: over the second half only the occasional one-token probe.
    half = adaptive["bad"][len(adaptive["bad"]) // 2]
    assert bad.rejected_prediction_tokens - half.rejected_prediction_tokens <= 40 // PROBE_EVERY + 1
    assert adaptive["good"][-1].accepted_prediction_tokens > 60


def test_a_speculating_requests_kv_serves_the_prefix_cache(lm):
    prompts = _prompts(4, seed=8)

    def run(spec):
        cfg = EngineConfig(eos_token_ids=lm[2].eos_token_ids, speculate=spec)
        with Engine(lm[0], cfg).start() as engine:
            first = _run(engine, [Request(f"a{i}", p, GREEDY) for i, p in enumerate(prompts)])
            # The next turn's prompt holds the answer: its KV (written by verify steps and
            # rolled back where proposals failed) is what the prefix cache hands out.
            again = [
                Request(f"b{i}", p + _tokens(first[f"a{i}"]) + [5, 6], GREEDY)
                for i, p in enumerate(prompts)
            ]
            second = _run(engine, again)
            return [_tokens(v) for v in (*first.values(), *second.values())], engine.stats()

    plain, _ = run(SpecConfig())
    spec, stats = run(ALWAYS)
    assert spec == plain
    assert stats["cache_hits"] == 4 and stats["spec_accepted_tokens"] > 0
    assert stats["cache_hit_tokens"] >= sum(len(p) + GREEDY.max_tokens - 1 for p in prompts)


def test_sampled_output_keeps_its_distribution_with_a_prediction(lm):
    """Two sampled tokens (top_k 3) over many seeds, predicted with a likely-but-not-top pair:
    the outcomes follow the model's own two-token distribution (chi-square, 8 df)."""
    model = lm[0]
    prompt = [5, 17, 99, 230]
    params = SamplingParams(temperature=1.0, top_k=3, max_tokens=2, ignore_eos=True)

    def top3(ids):
        logits = model(mx.array(ids)[None])[0, -1].astype(mx.float32)
        order = np.argsort(-np.array(logits))[:3]
        p = np.exp(np.array(logits)[order] - np.array(logits)[order].max())
        return order.tolist(), p / p.sum()

    first, p1 = top3(prompt)
    exact = {}
    for t1, q1 in zip(first, p1, strict=True):
        second, p2 = top3(prompt + [t1])
        for t2, q2 in zip(second, p2, strict=True):
            exact[(t1, t2)] = q1 * q2
    prediction = [first[1], top3(prompt + [first[1]])[0][1]]
    n = 400
    with _engine(lm, max_waiting=n) as engine:
        reqs = [
            Request(f"s{i}", prompt, params.replace(seed=i), prediction=prediction)
            for i in range(n)
        ]
        out = _run(engine, reqs)
        assert engine.stats()["spec_accepted_tokens"] > 0
    counts: dict[tuple, int] = {}
    for events in out.values():
        key = tuple(_tokens(events))
        counts[key] = counts.get(key, 0) + 1
    assert set(counts) <= set(exact)
    stat = sum((counts.get(k, 0) - p * n) ** 2 / (p * n) for k, p in exact.items())
    assert stat < 26.1, (stat, counts)  # chi-square(8) at 0.999
