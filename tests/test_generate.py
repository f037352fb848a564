"""generate_stream (the engine's synchronous face) on a tiny llama: stops, limits, seeds,
logprobs, context checks, prefix-cache reuse across calls, abort on close."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from plain_decode import plain_greedy

from mlxrun.engine import Request
from mlxrun.errors import ContextLengthExceededError, InvalidRequestError
from mlxrun.generate import GenerationChunk, generate, generate_stream, local_engine
from mlxrun.sampling import SamplingParams, compute_logprobs

pytestmark = pytest.mark.model

PROMPT = "def add(a, b):\n    return a + b\n\nclass Point:"
WORDS = (" return", " self", " def", " value", " None", " print")


@pytest.fixture(scope="module")
def lm(checkpoint_factory):
    from mlxrun.loader import load

    model, tokenizer, info = load(str(checkpoint_factory("llama")))
    return model, tokenizer, info


def _run(lm, ids, **params) -> list[GenerationChunk]:
    model, tokenizer, _ = lm
    return list(generate_stream(model, tokenizer, ids, SamplingParams(**params)))


def _greedy(lm, ids, n=24, **kw) -> list[GenerationChunk]:
    return _run(lm, ids, temperature=0, max_tokens=n, ignore_eos=True, **kw)


def test_max_tokens_finishes_with_length(lm):
    ids = lm[1].encode(PROMPT)
    chunks = _greedy(lm, ids, n=7)
    assert len(chunks) == 7
    assert [c.finish_reason for c in chunks] == [None] * 6 + ["length"]
    assert chunks[-1].generation_tokens == 7
    assert chunks[-1].prompt_tokens == len(ids)
    assert all(c.token_id is not None for c in chunks)


def _word_bias(tokenizer) -> dict[int, float]:
    """+100 on a few one-token words: greedy output is then a model-chosen sequence of clean
    words (a random model otherwise emits stray bytes)."""
    ids = [tokenizer.encode(w) for w in WORDS]
    return {i[0]: 100.0 for i in ids if len(i) == 1}


def test_stop_string_across_token_boundary_is_never_emitted(lm):
    tokenizer = lm[1]
    ids = tokenizer.encode(PROMPT)
    bias = _word_bias(tokenizer)
    assert len(bias) >= 3
    chunks = _greedy(lm, ids, n=30, logit_bias=bias)
    full = "".join(c.text for c in chunks)
    texts = [c.text for c in chunks]
    assert all(t.strip() in {w.strip() for w in WORDS} for t in texts), texts
    # The end of token 10's text and the start of token 11's: the stop arrives in two pieces.
    stop = texts[10][-2:] + texts[11][:2]
    expected = full[: full.index(stop)]

    stopped = _greedy(lm, ids, n=30, logit_bias=bias, stop=[stop, "never-in-output-zzz"])
    text = "".join(c.text for c in stopped)
    assert text == expected
    assert stop not in text
    assert stopped[-1].finish_reason == "stop"
    assert all(c.finish_reason is None for c in stopped[:-1])
    assert len(stopped) <= 12


def test_stop_token_id_ends_without_text(lm):
    ids = lm[1].encode(PROMPT)
    plain = _greedy(lm, ids, n=12)
    target = plain[5].token_id
    first = next(i for i, c in enumerate(plain) if c.token_id == target)
    chunks = _greedy(lm, ids, n=12, stop_token_ids=[target])
    assert [c.token_id for c in chunks[:-1]] == [c.token_id for c in plain[:first]]
    last = chunks[-1]
    assert last.finish_reason == "stop" and last.token_id is None
    assert last.generation_tokens == first + 1


def test_seed_determinism(lm):
    ids = lm[1].encode(PROMPT)
    kw = dict(temperature=1.0, top_p=0.95, max_tokens=16, ignore_eos=True)
    a = [c.token_id for c in _run(lm, ids, seed=7, **kw)]
    b = [c.token_id for c in _run(lm, ids, seed=7, **kw)]
    c = [c.token_id for c in _run(lm, ids, seed=8, **kw)]
    assert a == b
    assert a != c


def test_logprobs_match_compute_logprobs(lm):
    model, tokenizer, _ = lm
    ids = tokenizer.encode(PROMPT)
    chunks = _greedy(lm, ids, n=10, logprobs=True, top_logprobs=5)
    generated = [c.token_id for c in chunks]
    logits = model(mx.array([ids + generated]))[0]  # (L, V)
    expected = np.array(compute_logprobs(logits[len(ids) - 1 : -1]))  # (10, V)
    for i, c in enumerate(chunks):
        assert c.logprob == pytest.approx(float(expected[i, c.token_id]), abs=1e-4)
        assert len(c.top_logprobs) == 5
        top_ids = [t for t, _ in c.top_logprobs]
        values = [v for _, v in c.top_logprobs]
        assert top_ids[0] == c.token_id  # greedy picks the most likely token
        assert values == sorted(values, reverse=True)
        np.testing.assert_allclose(values, expected[i, top_ids], atol=1e-4)
        assert top_ids == np.argsort(-expected[i])[:5].tolist()


def test_no_logprobs_unless_asked(lm):
    chunks = _greedy(lm, lm[1].encode(PROMPT), n=3)
    assert all(c.logprob is None and c.top_logprobs is None for c in chunks)


def test_logit_bias_reaches_the_sampler(lm):
    chunks = _greedy(lm, lm[1].encode(PROMPT), n=5, logit_bias={123: 100.0})
    assert [c.token_id for c in chunks] == [123] * 5


def test_context_exceeded_names_both_numbers(lm):
    ids = lm[1].encode(PROMPT)
    model, tokenizer, _ = lm
    params = SamplingParams(temperature=0, max_tokens=4)
    with pytest.raises(ContextLengthExceededError) as exc:
        next(generate_stream(model, tokenizer, ids, params, context_length=len(ids) - 1))
    assert exc.value.prompt_tokens == len(ids)
    assert exc.value.limit == len(ids) - 1
    assert str(len(ids)) in exc.value.message and str(len(ids) - 1) in exc.value.message

    # The prompt fits but prompt + max_tokens does not.
    with pytest.raises(ContextLengthExceededError) as exc:
        next(generate_stream(model, tokenizer, ids, params, context_length=len(ids) + 3))
    assert exc.value.param == "max_tokens"
    assert exc.value.prompt_tokens == len(ids)
    assert exc.value.limit == len(ids) + 3
    assert "max_tokens (4)" in exc.value.message and str(len(ids) + 3) in exc.value.message


def test_generation_stops_at_the_context_end(lm):
    model, tokenizer, _ = lm
    ids = tokenizer.encode(PROMPT)
    params = SamplingParams(temperature=0, ignore_eos=True)  # no max_tokens
    chunks = list(generate_stream(model, tokenizer, ids, params, context_length=len(ids) + 6))
    assert len(chunks) == 6
    assert chunks[-1].finish_reason == "length"


def test_empty_prompt_is_rejected(lm):
    model, tokenizer, _ = lm
    with pytest.raises(InvalidRequestError):
        next(generate_stream(model, tokenizer, [], SamplingParams()))


def _ids_of(chunks: list[GenerationChunk]) -> list[int]:
    return [c.token_id for c in chunks if c.token_id is not None]


def test_engine_prefix_cache_prefills_only_new_tokens(lm):
    model, tokenizer, _ = lm
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    turn1 = tokenizer.encode(PROMPT)
    with local_engine(model, tokenizer) as engine:
        first = list(generate_stream(model, tokenizer, turn1, params, engine=engine))
        assert first[-1].prefilled_tokens == len(turn1) and first[-1].cached_tokens == 0
        reply = _ids_of(first)
        new = tokenizer.encode("\n\ndef sub(a, b):")
        turn2 = turn1 + reply + new
        second = list(generate_stream(model, tokenizer, turn2, params, engine=engine))
        assert engine.stats()["running"] == 0
    # What the last request fed is reused: the prompt and the reply but at most its last token.
    assert second[-1].cached_tokens >= len(turn1) + len(reply) - 1
    assert second[-1].prefilled_tokens <= len(new) + 1
    assert second[-1].prompt_tokens == len(turn2)
    fresh = list(generate_stream(model, tokenizer, turn2, params))
    assert _ids_of(second) == _ids_of(fresh)


def test_engine_prefix_cache_reuses_up_to_a_diverging_tail(lm):
    model, tokenizer, _ = lm
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    ids = tokenizer.encode(PROMPT)
    edited = ids[:5] + tokenizer.encode(" something else entirely")
    assert edited[:6] != ids[:6]
    with local_engine(model, tokenizer) as engine:
        list(generate_stream(model, tokenizer, ids, params, engine=engine))
        out = list(generate_stream(model, tokenizer, edited, params, engine=engine))
        # The same ids again: everything but the last id comes from the cache.
        again = list(generate_stream(model, tokenizer, edited, params, engine=engine))
    assert out[-1].prefilled_tokens == len(edited) - 5
    fresh = list(generate_stream(model, tokenizer, edited, params))
    assert _ids_of(out) == _ids_of(fresh)
    assert again[-1].prefilled_tokens == 1
    assert _ids_of(again) == _ids_of(fresh)


def test_closing_a_stream_aborts_the_request_and_keeps_its_kv(lm):
    model, tokenizer, _ = lm
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    ids = tokenizer.encode(PROMPT)
    with local_engine(model, tokenizer) as engine:
        stream = generate_stream(model, tokenizer, ids, params, engine=engine)
        taken = [next(stream).token_id for _ in range(3)]
        stream.close()  # the consumer stops reading (e.g. Ctrl-C in a chat REPL)
        stats = engine.stats()
        assert stats["aborted"] == 1 and stats["running"] == 0 and stats["waiting"] == 0
        assert stats["generation_tokens"] < 200
        turn2 = ids + taken + tokenizer.encode(" more")
        short = params.replace(max_tokens=8)
        out = list(generate_stream(model, tokenizer, turn2, short, engine=engine))
    assert out[-1].cached_tokens >= len(ids) + len(taken) - 1
    fresh = list(generate_stream(model, tokenizer, turn2, short))
    assert _ids_of(out) == _ids_of(fresh)


def test_chunked_prefill_matches_one_shot(lm):
    model, tokenizer, _ = lm
    ids = tokenizer.encode(PROMPT * 3)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    one = list(generate_stream(model, tokenizer, ids, params, prefill_step_size=4096))
    small = list(generate_stream(model, tokenizer, ids, params, prefill_step_size=5))
    assert [c.token_id for c in one] == [c.token_id for c in small]


def test_generate_returns_the_streamed_text(lm):
    model, tokenizer, _ = lm
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    text = generate(model, tokenizer, PROMPT, params)
    chunks = _greedy(lm, tokenizer.encode(PROMPT), n=10)
    assert text == "".join(c.text for c in chunks)
    ids = [c.token_id for c in chunks]
    assert text == tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("ignore_eos", [True, False])
def test_one_greedy_text_from_generate_the_engine_and_a_plain_loop(lm, ignore_eos):
    """generate() is a face over the engine, not a loop of its own: its greedy text is the
    engine's, which is the textbook one-sequence loop's (tests/plain_decode.py)."""
    model, tokenizer, info = lm
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=ignore_eos)
    ids = tokenizer.encode(PROMPT)
    text = generate(model, tokenizer, PROMPT, params, context_length=info.context_length)
    with local_engine(model, tokenizer, info.context_length) as engine:
        events = engine.generate_sync(Request("e", ids, params))
    engine_ids = [t for e in events for t in e.new_token_ids]
    plain_ids = [s.token_id for s in plain_greedy(model, ids, params, info.eos_token_ids)]
    assert engine_ids == plain_ids and len(plain_ids) > 0
    assert text == tokenizer.decode(engine_ids, skip_special_tokens=True)
    assert events[-1].finish_reason == ("length" if len(plain_ids) == 40 else "stop")


def test_stats_are_filled(lm):
    chunks = _greedy(lm, lm[1].encode(PROMPT), n=6)
    last = chunks[-1]
    assert last.prompt_tps > 0 and last.generation_tps > 0
    assert last.peak_memory_gb > 0
