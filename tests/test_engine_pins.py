"""Pinned prefixes (Anthropic's cache_control): a pinned prompt prefix survives the LRU eviction
that would otherwise drop it, until its time runs out."""

from __future__ import annotations

import random

import pytest

from mlxrun.engine import Engine, EngineConfig, Request
from mlxrun.sampling import SamplingParams

pytestmark = pytest.mark.model

PARAMS = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)


@pytest.fixture(scope="module")
def lm(checkpoint_factory):
    from mlxrun.loader import load

    return load(str(checkpoint_factory("llama")))


def _prompt(seed: int, n: int = 120) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 900) for _ in range(n)]


def _engine(lm, capacity: int, **kw) -> Engine:
    config = EngineConfig(eos_token_ids=lm[2].eos_token_ids, cache_memory_bytes=capacity, **kw)
    return Engine(lm[0], config).start()


def _cached(engine: Engine, rid: str, prompt: list[int], pin: int = 0) -> int:
    events = engine.generate_sync(Request(rid, prompt, PARAMS, pin_prefix=pin))
    return events[-1].cached_tokens


def _one_request_bytes(lm) -> int:
    with _engine(lm, 1 << 30) as engine:
        _cached(engine, "m", _prompt(0))
        return engine.stats()["cache_memory_bytes"]


@pytest.mark.parametrize("pin", [0, 100])
def test_a_pinned_prefix_outlives_lru_eviction(lm, pin):
    capacity = int(_one_request_bytes(lm) * 2.5)  # room for two requests' KV
    shared = _prompt(1)
    with _engine(lm, capacity) as engine:
        assert _cached(engine, "a", shared, pin=pin) == 0
        for i in range(4):  # newer requests push the first one out of the LRU order
            _cached(engine, f"f{i}", _prompt(10 + i))
        hit = _cached(engine, "b", shared[:100] + _prompt(99, 20))
        stats = engine.stats()
    if pin:
        assert hit == 100 and stats["pinned_prefixes"] == 1
    else:
        assert hit == 0 and stats["pinned_prefixes"] == 0


def test_pins_expire_and_are_bounded(lm):
    with _engine(lm, 1 << 30, pin_ttl_s=0.0, max_pinned_prefixes=2) as engine:
        _cached(engine, "a", _prompt(1), pin=50)
        _cached(engine, "b", _prompt(2), pin=50)  # its step releases the expired pin of "a"
        assert engine.stats()["pinned_prefixes"] <= 1
    with _engine(lm, 1 << 30, max_pinned_prefixes=2) as engine:
        for i in range(4):
            _cached(engine, f"p{i}", _prompt(i), pin=50)
        assert engine.stats()["pinned_prefixes"] == 2
