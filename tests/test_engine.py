"""The batched engine on tiny models: exactness against a plain one-sequence loop, per-request
parameters in one batch, chunked prefill, prefix cache (memory and disk), aborts, groups,
priorities and overload."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time

import mlx.core as mx
import pytest
from plain_decode import plain_greedy

from mlxrun.engine import Engine, EngineConfig, Event, Request
from mlxrun.errors import ContextLengthExceededError, EngineOverloadedError, InvalidRequestError
from mlxrun.sampling import SamplingParams

pytestmark = pytest.mark.model

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def _load(checkpoint_factory, arch: str):
    from mlxrun.loader import load

    return load(str(checkpoint_factory(arch)))


@pytest.fixture(scope="module")
def lm(checkpoint_factory):
    return _load(checkpoint_factory, "llama")


def _prompts(n: int, seed: int = 0, lo: int = 3, hi: int = 60) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, 400) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


def _reference(lm, ids: list[int], params: SamplingParams) -> list[int]:
    """Greedy tokens from the textbook loop (tests/plain_decode.py): no batch, no pipelining."""
    return [s.token_id for s in plain_greedy(lm[0], ids, params, lm[2].eos_token_ids)]


def _run_all(engine: Engine, requests: list[Request]) -> dict[str, list[Event]]:
    streams = [engine.submit_sync(r) for r in requests]
    return {s.id: list(s) for s in streams}


def _tokens(events: list[Event]) -> list[int]:
    return [t for e in events for t in e.new_token_ids]


def _engine(lm, **kw) -> Engine:
    return Engine(lm[0], EngineConfig(eos_token_ids=lm[2].eos_token_ids, **kw)).start()


# ------------------------------------------------------------------ exactness


@pytest.mark.parametrize(
    "arch", ["llama", "qwen2", "mistral", "gemma2", "phi3", "mixtral", "qwen3_moe"]
)
def test_greedy_tokens_are_the_same_alone_beside_15_others_and_in_a_plain_loop(
    checkpoint_factory, arch
):
    lm = _load(checkpoint_factory, arch)
    prompts = _prompts(16, seed=len(arch))
    refs = [_reference(lm, ids, GREEDY) for ids in prompts]
    with _engine(lm, cache_memory_bytes=0) as engine:
        alone = [
            _tokens(engine.generate_sync(Request(f"a{i}", prompts[i], GREEDY))) for i in (0, 1)
        ]
        batch = _run_all(engine, [Request(f"r{i}", p, GREEDY) for i, p in enumerate(prompts)])
    assert alone == refs[:2]
    assert [_tokens(batch[f"r{i}"]) for i in range(16)] == refs
    assert all(len(r) == 10 for r in refs)


def test_per_request_parameters_share_one_batch(lm):
    ids = _prompts(1, seed=3, lo=20, hi=21)[0]
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=7, max_tokens=12, ignore_eos=True)
    penalised = GREEDY.replace(
        presence_penalty=1.5, frequency_penalty=0.5, repetition_penalty=1.3, max_tokens=12
    )
    forced = GREEDY.replace(logit_bias={77: 100.0})
    requests = [
        Request("s1", ids, seeded),
        Request("s2", ids, seeded),
        Request("s3", ids, seeded.replace(seed=8)),
        Request("pen", ids, penalised),
        Request("bias", ids, forced),
        Request("short", ids, GREEDY.replace(max_tokens=3)),
        Request("lp", ids, GREEDY.replace(logprobs=True, top_logprobs=3)),
        *(Request(f"x{i}", p, GREEDY) for i, p in enumerate(_prompts(6, seed=4))),
    ]
    with _engine(lm) as engine:
        out = _run_all(engine, requests)
        solo = _tokens(engine.generate_sync(Request("s-alone", ids, seeded)))
    assert _tokens(out["s1"]) == _tokens(out["s2"]) == solo  # a seed reproduces within a batch
    assert _tokens(out["s3"]) != _tokens(out["s1"])
    assert _tokens(out["pen"]) == _reference(lm, ids, penalised)
    assert _tokens(out["pen"]) != _reference(lm, ids, GREEDY.replace(max_tokens=12))
    assert _tokens(out["bias"]) == [77] * 10
    assert len(_tokens(out["short"])) == 3 and out["short"][-1].finish_reason == "length"
    assert _tokens(out["lp"]) == _reference(lm, ids, GREEDY)
    ref_steps = plain_greedy(lm[0], ids, GREEDY)
    for event, step in zip(out["lp"], ref_steps, strict=True):
        (lp,) = event.logprobs
        assert lp.token_id == step.token_id and len(lp.top) == 3
        assert lp.top[0][0] == lp.token_id and lp.top[0][1] == pytest.approx(lp.logprob)
        assert lp.logprob == pytest.approx(step.logprob, abs=1e-3)
        assert [t for t, _ in lp.top] == [t for t, _ in step.top[:3]]


def test_stop_token_ids_and_eos_end_without_emitting_the_token(lm):
    ids = _prompts(1, seed=5)[0]
    ref = _reference(lm, ids, GREEDY)
    stop = ref[3]
    first = ref.index(stop)
    with _engine(lm) as engine:
        by_id = engine.generate_sync(Request("a", ids, GREEDY.replace(stop_token_ids=[stop])))
    assert _tokens(by_id) == ref[:first]
    assert by_id[-1].finish_reason == "stop" and by_id[-1].new_token_ids == []
    eos_lm = (lm[0], lm[1], dataclasses.replace(lm[2], eos_token_ids=(stop,)))
    with _engine(eos_lm) as engine:
        by_eos = engine.generate_sync(Request("b", ids, GREEDY.replace(ignore_eos=False)))
        ignored = engine.generate_sync(Request("c", ids, GREEDY))
    assert _tokens(by_eos) == ref[:first] and by_eos[-1].finish_reason == "stop"
    assert _tokens(ignored) == ref


def test_bad_requests_are_refused_before_they_queue(lm):
    with _engine(lm, context_length=64) as engine:
        with pytest.raises(InvalidRequestError) as err:
            engine.submit_sync(Request("a", [], GREEDY))
        assert err.value.param == "prompt"
        with pytest.raises(InvalidRequestError):
            engine.submit_sync(Request("b", [1, 2], GREEDY.replace(logit_bias={10**6: 1.0})))
        with pytest.raises(ContextLengthExceededError):
            engine.submit_sync(Request("c", [1] * 60, GREEDY))
        with pytest.raises(InvalidRequestError):
            engine.submit_sync(Request("d", [1, 10**7], GREEDY))
        assert engine.stats()["waiting"] == engine.stats()["running"] == 0


# ------------------------------------------------------------------ scheduling


def _wait_for(predicate, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise TimeoutError("condition not reached")
        time.sleep(0.005)


def test_a_long_prompt_arriving_mid_stream_never_stalls_a_decoder(lm):
    long_prompt = [random.Random(1).randrange(10, 400) for _ in range(4000)]
    with _engine(lm, max_tokens_per_step=256, cache_memory_bytes=0) as engine:
        short = engine.submit_sync(Request("short", [5, 6, 7], GREEDY.replace(max_tokens=5000)))
        first = next(short)
        long = engine.submit_sync(Request("long", long_prompt, GREEDY.replace(max_tokens=1)))
        long_events = list(long)
        short.abort()
        rest = list(short)
    steps = [first.step] + [e.step for e in rest if e.new_token_ids]
    # The long prompt took at least 4000 / 256 steps, and the short request got a token in
    # every one of them: never more than one chunk between two of its tokens.
    assert long_events[0].step - first.step >= 4000 // 256
    assert steps[-1] >= long_events[0].step
    assert all(b - a == 1 for a, b in zip(steps, steps[1:], strict=False)), steps


@pytest.mark.parametrize("priority", [1, 0])
def test_an_interactive_request_overtakes_a_long_prefill(lm, priority):
    long_prompt = [random.Random(2).randrange(10, 400) for _ in range(4000)]
    with _engine(lm, max_tokens_per_step=256, cache_memory_bytes=0) as engine:
        long = engine.submit_sync(Request("long", long_prompt, GREEDY.replace(max_tokens=1)))
        _wait_for(lambda: engine.stats()["prompt_tokens"] > 0)
        quick = engine.submit_sync(
            Request("quick", [9, 8, 7], GREEDY.replace(max_tokens=1), priority=priority)
        )
        quick_step = next(quick).step
        long_step = next(long).step
    if priority:
        assert quick_step < long_step
    else:  # the control: at equal priority it waits for the long prompt's last chunk
        assert quick_step >= long_step


def test_a_full_queue_raises_engine_overloaded(lm):
    params = GREEDY.replace(max_tokens=400)
    with _engine(lm, max_running=1, max_waiting=2) as engine:
        streams = []
        with pytest.raises(EngineOverloadedError) as err:
            for i in range(4):
                streams.append(engine.submit_sync(Request(f"r{i}", [1, 2, 3], params)))
        assert len(streams) == 3 and err.value.retry_after > 0
        for s in streams:
            s.abort()
        assert all(list(s)[-1].finish_reason == "abort" for s in streams)


# ------------------------------------------------------------------ aborts and groups


def test_abort_stops_a_request_within_one_step(lm):
    with _engine(lm) as engine:
        stream = engine.submit_sync(Request("a", [1, 2, 3], GREEDY.replace(max_tokens=500)))
        for _ in range(3):
            next(stream)
        at = engine.stats()["steps"]
        stream.abort()
        rest = list(stream)
    assert rest[-1].finish_reason == "abort" and rest[-1].new_token_ids == []
    assert rest[-1].step <= at + 1
    assert engine.stats()["aborted"] == 1


def test_a_new_request_cancels_older_ones_of_its_group(lm):
    with _engine(lm) as engine:
        old = engine.submit_sync(
            Request("old", [1, 2, 3], GREEDY.replace(max_tokens=500), group="g")
        )
        next(old)
        new = engine.generate_sync(
            Request("new", [1, 2, 4], GREEDY.replace(max_tokens=5), group="g")
        )
        old_events = list(old)
        stats = engine.stats()
    assert old_events[-1].finish_reason == "abort"
    assert len(_tokens(new)) == 5 and new[-1].finish_reason == "length"
    assert stats["group_cancellations"] == 1


def test_aborting_100_requests_gives_the_memory_back(lm):
    prompts = _prompts(100, seed=9, lo=20, hi=200)
    with _engine(lm, cache_memory_bytes=0) as engine:
        engine.generate_sync(Request("warm", prompts[0], GREEDY))
        mx.synchronize()
        baseline = mx.get_active_memory()
        streams = [
            engine.submit_sync(Request(f"r{i}", p, GREEDY.replace(max_tokens=1000)))
            for i, p in enumerate(prompts)
        ]
        for i, s in enumerate(streams):
            if i % 3 == 0:
                s.abort()  # still waiting, most of them
        for i, s in enumerate(streams):
            if i % 3:
                next(s)  # decoding by now
                s.abort()
        assert all(list(s)[-1].finish_reason == "abort" for s in streams)
        _wait_for(lambda: engine.stats()["running"] == 0)
        time.sleep(0.05)
        mx.synchronize()
        leaked = mx.get_active_memory() - baseline
    # One leaked request's KV (20+ tokens, 2 layers) would already exceed this.
    assert leaked < 16 * 1024, leaked


def test_async_streams_and_leaving_early_aborts(lm):
    ids = _prompts(1, seed=6)[0]

    async def main(engine: Engine):
        async def collect(rid):
            return [e async for e in engine.submit(Request(rid, ids, GREEDY))]

        a, b = await asyncio.gather(collect("a"), collect("b"))
        async with engine.submit(Request("c", ids, GREEDY.replace(max_tokens=500))) as stream:
            async for _ in stream:
                break
        return a, b

    with _engine(lm) as engine:
        a, b = asyncio.run(main(engine))
        _wait_for(lambda: engine.stats()["running"] == 0)
        assert engine.stats()["aborted"] == 1
    assert _tokens(a) == _tokens(b) == _reference(lm, ids, GREEDY)


# ------------------------------------------------------------------ prefix cache


def test_a_shared_prefix_is_reused_and_only_the_rest_is_prefilled(lm):
    prefix = _prompts(1, seed=7, lo=60, hi=61)[0]
    second = prefix[:50] + [11, 12, 13, 14, 15, 16, 17, 18, 19, 20]
    with _engine(lm) as engine:
        first = engine.generate_sync(Request("a", prefix, GREEDY))
        before = engine.stats()["prompt_tokens"]
        hit = engine.generate_sync(Request("b", second, GREEDY))
        prefilled = engine.stats()["prompt_tokens"] - before
        again = engine.generate_sync(Request("c", prefix, GREEDY))
    assert first[0].cached_tokens == 0
    assert hit[0].cached_tokens == 50 and prefilled == len(second) - 50
    assert _tokens(hit) == _reference(lm, second, GREEDY)
    assert again[0].cached_tokens == len(prefix) - 1  # the last token is always computed
    assert _tokens(again) == _tokens(first)


def test_the_disk_tier_hits_after_a_restart(lm, tmp_path):
    ids = _prompts(1, seed=8, lo=40, hi=41)[0]
    cfg = {"cache_dir": str(tmp_path), "namespace": "tiny-llama"}
    with _engine(lm, **cfg) as engine:
        cold = engine.generate_sync(Request("a", ids, GREEDY))
    assert list(tmp_path.glob("*/*.safetensors"))  # written at shutdown
    with _engine(lm, **cfg) as engine:
        prompt = ids + _tokens(cold)[:5] + [3]
        warm = engine.generate_sync(Request("a", prompt, GREEDY))
        assert engine.stats()["disk_hits"] == 1
    with _engine(lm, cache_dir=str(tmp_path), namespace="another-model") as engine:
        other = engine.generate_sync(Request("a", ids, GREEDY))
    assert cold[0].cached_tokens == 0 and other[0].cached_tokens == 0
    assert warm[0].cached_tokens == len(ids) + 5
    assert _tokens(warm) == _reference(lm, prompt, GREEDY)


def test_a_sliding_window_model_batches_without_the_prefix_cache():
    """mlx-lm gemma3-style layers alternate RotatingKVCache and KVCache: no prefix caching (a
    rotated window cannot be cut and reused), but batching still works and stays exact."""
    from mlx_lm.generate import generate_step
    from mlx_lm.models import gemma3_text

    args = gemma3_text.ModelArgs(
        model_type="gemma3_text", hidden_size=64, num_hidden_layers=4, intermediate_size=128,
        num_attention_heads=4, head_dim=16, vocab_size=500, num_key_value_heads=2,
        sliding_window=16, sliding_window_pattern=2,
    )  # fmt: skip
    mx.random.seed(0)
    model = gemma3_text.Model(args)
    mx.eval(model.parameters())
    prompts = _prompts(8, seed=11, lo=3, hi=40)  # most longer than the window
    refs = [
        [int(t) for t, _ in generate_step(mx.array(p), model, max_tokens=24, sampler=_argmax)]
        for p in prompts
    ]
    with Engine(model, EngineConfig()) as engine:
        out = _run_all(
            engine,
            [Request(f"r{i}", p, GREEDY.replace(max_tokens=24)) for i, p in enumerate(prompts)],
        )
        again = engine.generate_sync(Request("again", prompts[0], GREEDY))
        stats = engine.stats()
    assert [_tokens(out[f"r{i}"]) for i in range(8)] == refs
    events = [e for evs in out.values() for e in evs]
    assert len({e.step for e in events}) < len(events) / 4  # rows decoded together
    assert again[0].cached_tokens == 0 and "cache_memory_bytes" not in stats


def _argmax(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def test_batch_caches_are_chosen_by_trying_them(checkpoint_factory):
    """mlx-lm's gemma2 groups query heads in 5-D scores, which its plain batch mask cannot
    broadcast against: the probe picks the grouped-mask cache there and mlx-lm's own elsewhere."""
    from mlxrun import models
    from mlxrun.batch import GroupedMaskBatchKVCache, batch_merge

    gemma2 = _load(checkpoint_factory, "gemma2")[0]
    llama = _load(checkpoint_factory, "llama")[0]
    assert batch_merge(gemma2, lambda: models.make_cache(gemma2)) == GroupedMaskBatchKVCache.merge
    assert batch_merge(llama, lambda: models.make_cache(llama)) != GroupedMaskBatchKVCache.merge
