"""Many models behind one server (server/models_pool.py): three tiny models in a budget that holds
two, driven by the real openai / anthropic / ollama clients against uvicorn on loopback."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import anthropic
import httpx
import ollama
import openai
import pytest

from mlxrun.engine import EngineConfig
from mlxrun.server import model_loading
from mlxrun.server.app import ServerConfig, create_app
from mlxrun.server.models_pool import ModelPool, ModelSpec, PoolSettings
from serverutil import make_app, serve_in_thread

NAMES = ("m0", "m1", "m2")
CONTEXT = 512
CACHE = 8 << 20
PROMPTS = ["Write a function that adds two numbers.", "Sort a list in Python.", "Hello there"]

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def models(checkpoint_factory):
    return [checkpoint_factory("llama", num_shards=1, seed=i) for i in range(3)]


def _specs(models, **kw) -> list[ModelSpec]:
    return [ModelSpec(n, str(p), context=CONTEXT, **kw) for n, p in zip(NAMES, models, strict=True)]


def _charge(models) -> int:
    """What one model is charged (weights + KV + prefix cache); the three are the same size."""
    settings = PoolSettings(budget_bytes=1 << 40, engine=EngineConfig(cache_memory_bytes=CACHE))
    return model_loading.estimate(_specs(models)[0], settings, 1 << 40).nbytes


def pool_app(models, fits: float = 2.5, **settings):
    """An app serving m0, m1, m2 from a pool whose budget holds `fits` of them."""
    engine = settings.pop("engine", EngineConfig(cache_memory_bytes=CACHE))
    budget = int(_charge(models) * fits)
    pool = ModelPool(_specs(models), PoolSettings(budget, engine=engine, **settings))
    config = ServerConfig(model_id="m0", context_length=CONTEXT)
    return create_app(None, config, tokenizer=None, pool=pool), pool


def _chat(client: openai.OpenAI, model: str, prompt: str, n: int = 8) -> str:
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=n, temperature=0
    )
    assert r.model == model and r.usage.completion_tokens >= 1
    return r.choices[0].message.content


def _loaded(base: str) -> list[str]:
    return [m["name"].removesuffix(":latest") for m in httpx.get(base + "/api/ps").json()["models"]]


def _metric(base: str, name: str, model: str) -> float:
    for line in httpx.get(base + "/metrics").text.splitlines():
        if line.startswith(f'mlxrun_{name}{{model="{model}"}}'):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} for {model}")


@pytest.fixture(scope="module")
def reference(models):
    """Each model served alone (the one-model server): greedy outputs per prompt."""
    out = {}
    for name, path in zip(NAMES, models, strict=True):
        with serve_in_thread(make_app(path, context=CONTEXT, model_id=name)) as base:
            client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
            out[name] = {p: _chat(client, name, p) for p in PROMPTS}
    return out


class _PsSampler:
    """Polls /api/ps in the background; `most` is the largest count seen."""

    def __init__(self, base: str):
        self.base, self.most, self.samples = base, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.most = max(self.most, len(_loaded(self.base)))
            self.samples += 1
            time.sleep(0.01)

    def __enter__(self) -> _PsSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_sixty_requests_over_three_models_in_a_budget_for_two(models, reference):
    app, pool = pool_app(models)
    with serve_in_thread(app) as base, _PsSampler(base) as ps:
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
        jobs = []  # 20 rounds of 3: two at once (one model may need loading), then one alone
        for r in range(20):
            a, b = NAMES[r % 3], NAMES[(r + 1) % 3]
            jobs.append([(a, PROMPTS[r % 3]), (b, PROMPTS[(r + 1) % 3])])
            jobs.append([(NAMES[(r + 2) % 3] if r % 4 == 0 else a, PROMPTS[(r + 2) % 3])])
        done = 0
        with ThreadPoolExecutor(4) as pool_exec:
            for group in jobs:
                futures = [(m, p, pool_exec.submit(_chat, client, m, p)) for m, p in group]
                for model, prompt, future in futures:
                    assert future.result() == reference[model][prompt], (model, prompt)
                    done += 1
        evictions = sum(_metric(base, "model_evictions_total", n) for n in NAMES)
        loads = sum(_metric(base, "model_loads_total", n) for n in NAMES)
        resident = len(_loaded(base))
        memory = {n: _metric(base, "model_memory_bytes", n) for n in NAMES}
    assert done == 60
    assert ps.samples > 20 and ps.most <= 2 and pool.peak_resident <= 2
    # Every load past the first two evicted one model (nothing idled out within 5 minutes).
    assert resident == 2 and evictions >= 10 and loads == evictions + resident
    assert sorted(memory.values()) == [0, _charge(models), _charge(models)]  # the two loaded
    print(f"\n60 requests: {int(loads)} loads, {int(evictions)} evictions, "
          f"{ps.samples} /api/ps samples, most resident {ps.most}")  # fmt: skip


def test_a_load_never_holds_up_requests_to_resident_models(models, monkeypatch):
    """m2's load is slowed to 3 s; m0's requests meanwhile finish as fast as before."""
    real = model_loading.load_engine
    loading = threading.Event()

    def slow_load(spec, est, template):
        if spec.name == "m2":
            loading.set()
            time.sleep(3)
        return real(spec, est, template)

    monkeypatch.setattr(model_loading, "load_engine", slow_load)
    app, pool = pool_app(models, fits=3.5)
    with serve_in_thread(app) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
        _chat(client, "m0", PROMPTS[0])  # m0 resident
        start = time.perf_counter()
        _chat(client, "m0", PROMPTS[1])
        alone = time.perf_counter() - start
        with ThreadPoolExecutor(1) as ex:
            m2 = ex.submit(_chat, client, "m2", PROMPTS[2])
            assert loading.wait(30)
            during = []
            while not m2.done():
                start = time.perf_counter()
                _chat(client, "m0", PROMPTS[1])
                during.append(time.perf_counter() - start)
            m2.result()
        load_s = pool.slots["m2"].load_s
    assert len(during) >= 3 and load_s >= 3
    assert max(during) < 1.5, during  # a wait for the load would take >= 3 s
    print(f"\nm0 alone {alone * 1000:.0f} ms; during m2's {load_s:.1f} s load: "
          f"{len(during)} requests, slowest {max(during) * 1000:.0f} ms")  # fmt: skip


def test_ollama_load_unload_calls_and_keep_alive_zero(models):
    app, pool = pool_app(models)
    with serve_in_thread(app) as base:
        client = ollama.Client(host=base)
        r = client.generate(model="m1")  # the empty-prompt load call
        assert r.done and r.done_reason == "load" and _loaded(base) == ["m1"]
        ps = client.ps().models
        assert [m.model for m in ps] == ["m1:latest"] and ps[0].size_vram > 0
        assert ps[0].expires_at.timestamp() > time.time() + 200  # the default 5 minutes
        client.chat(model="m2:latest", messages=[], keep_alive="10m")
        assert sorted(_loaded(base)) == ["m1", "m2"]
        r = client.generate(model="m1", keep_alive=0)  # the unload call
        assert r.done_reason == "unload" and _loaded(base) == ["m2"]
        client.chat(model="m2", messages=[], keep_alive=0)
        assert _loaded(base) == []
        # keep_alive 0 on a real request: unloaded as soon as it is answered.
        r = client.generate(model="m0", prompt="hi", options={"num_predict": 3}, keep_alive=0)
        assert r.eval_count >= 1
        deadline = time.monotonic() + 2
        while _loaded(base) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _loaded(base) == []
        assert _metric(base, "model_unloads_total", "m2") == 1
        with pytest.raises(ollama.ResponseError) as e:
            client.generate(model="nope", prompt="hi")
        assert e.value.status_code == 404 and "m0" in e.value.error


def test_two_second_keep_alive_unloads_after_idling(models):
    app, _ = pool_app(models, keep_alive_s=2.0)
    with serve_in_thread(app) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
        _chat(client, "m0", PROMPTS[0])
        # The header sets a request's own keep-alive on the OpenAI routes.
        client.chat.completions.create(
            model="m1", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
            extra_headers={"X-Mlxrun-Keep-Alive": "-1"},
        )  # fmt: skip
        ps = {m["name"]: m for m in httpx.get(base + "/api/ps").json()["models"]}
        assert set(ps) == {"m0:latest", "m1:latest"}
        assert ps["m1:latest"]["expires_at"] > "2100"  # forever
        own = ps["m0:latest"]["mlxrun"]  # memory, last use, idle time
        assert own["memory_bytes"] == _charge(models) and own["running"] == 0
        assert own["last_used_at"] < ps["m0:latest"]["expires_at"] < "2100"
        time.sleep(1.0)
        assert "m0" in _loaded(base)  # still within its 2 s
        deadline = time.monotonic() + 5
        while "m0" in _loaded(base) and time.monotonic() < deadline:
            time.sleep(0.05)
        idle = 1.0 + 5 - (deadline - time.monotonic())
        assert _loaded(base) == ["m1"], idle
        assert 2.0 <= idle < 3.5
        r = httpx.post(base + "/v1/chat/completions", headers={"X-Mlxrun-Keep-Alive": "soon"},
                       json={"model": "m0", "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
        assert r.status_code == 400 and r.json()["error"]["param"] == "keep_alive"


def _long_stream(base: str, got: list, started: threading.Event) -> None:
    client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
    ids = httpx.post(base + "/tokenize", json={"model": "m0", "prompt": " the",
                                               "add_special_tokens": False}).json()["tokens"]  # fmt: skip
    stream = client.chat.completions.create(
        model="m0", messages=[{"role": "user", "content": "hi"}], max_tokens=300, stream=True,
        logit_bias={str(ids[0]): 100}, stream_options={"include_usage": True},
    )  # fmt: skip
    for chunk in stream:
        got.append(chunk)
        started.set()


def test_a_model_busy_streaming_is_not_evicted(models):
    app, _ = pool_app(models, max_loaded=1)
    with serve_in_thread(app) as base:
        got: list = []
        started = threading.Event()
        thread = threading.Thread(target=_long_stream, args=(base, got, started))
        thread.start()
        assert started.wait(60)
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.InternalServerError) as e:  # nothing can be evicted: 503
            _chat(client, "m1", "hi")
        assert e.value.status_code == 503 and "m0" in e.value.message
        assert e.value.body["code"] == "insufficient_memory"
        claude = anthropic.Anthropic(base_url=base, api_key="x", max_retries=0)
        with pytest.raises(anthropic.APIStatusError) as a:
            claude.messages.create(
                model="m2", max_tokens=4, messages=[{"role": "user", "content": "hi"}]
            )
        assert a.value.status_code == 503 and a.value.body["error"]["type"] == "overloaded_error"
        r = httpx.post(
            base + "/api/generate", json={"model": "m1", "prompt": "hi", "stream": False}
        )
        assert r.status_code == 503 and "m0" in r.json()["error"]
        assert _loaded(base) == ["m0"]  # still streaming, still loaded
        thread.join(60)
        assert got[-1].usage.completion_tokens == 300  # the stream ran to its end
        assert _chat(client, "m1", "hi")  # m0 is idle now: evicted for m1
        assert _loaded(base) == ["m1"]


def test_allocation_failure_mid_request_fails_only_that_request(models, monkeypatch):
    """MLX fails to allocate on the third prompt chunk of the long request (through the memory
    seam): it gets a 503, the requests running beside it finish, the server goes on."""
    from mlxrun import memory

    calls = {"long": 0}

    def allocation_point(tokens: int) -> None:
        if tokens >= 40:  # only the long prompt has chunks this big (the others are < 30 tokens)
            calls["long"] += 1
            if calls["long"] == 3:
                raise RuntimeError("[metal::malloc] Unable to allocate 1073741824 bytes.")

    monkeypatch.setattr(memory, "allocation_point", allocation_point)
    engine = EngineConfig(cache_memory_bytes=CACHE, max_tokens_per_step=64)
    app, _ = pool_app(models, engine=engine)
    with serve_in_thread(app) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
        long_prompt = " ".join(["numbers"] * 150)

        async def run() -> list:
            aclient = openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
            short = [aclient.chat.completions.create(
                model="m0", messages=[{"role": "user", "content": p}], max_tokens=40,
                temperature=0) for p in PROMPTS]  # fmt: skip
            long = aclient.chat.completions.create(
                model="m0", messages=[{"role": "user", "content": long_prompt}], max_tokens=4
            )
            return await asyncio.gather(long, *short, return_exceptions=True)

        long, *short = asyncio.run(run())
        assert isinstance(long, openai.InternalServerError) and long.status_code == 503
        assert long.body["code"] == "insufficient_memory" and "out of memory" in long.message
        assert calls["long"] == 3  # it failed mid-prompt, after two chunks
        assert all(r.usage.completion_tokens >= 1 for r in short), short
        assert _chat(client, "m0", PROMPTS[0])  # the server keeps serving
        assert httpx.get(base + "/health").json()["status"] == "ok"


def test_a_prompt_that_can_never_fit_the_budget_is_a_400(models):
    """The budget leaves m0 room for 64 tokens of KV: it is served with that context, and a
    longer prompt is context_length_exceeded rather than an allocation failure."""
    settings = PoolSettings(budget_bytes=1 << 40, engine=EngineConfig(cache_memory_bytes=CACHE))
    est = model_loading.estimate(_specs(models)[0], settings, 1 << 40)
    per_token = est.kv_bytes // (est.context * model_loading.PARALLEL_CONTEXTS)
    app, _ = pool_app(models, fits=(est.weights_bytes + CACHE + 64 * per_token) / est.nbytes)
    with serve_in_thread(app) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.BadRequestError) as e:
            _chat(client, "m0", " ".join(["numbers"] * 80))
        assert e.value.code == "context_length_exceeded" and "64 tokens" in e.value.message
        assert _chat(client, "m0", "hi", n=4)  # a prompt that fits is served
        assert client.models.retrieve("m0").model_extra["context_length"] == 64


def test_models_toml_default_sampling_fills_what_a_request_leaves_out(models):
    """m0's defaults: greedy and 3 tokens. Requests that say nothing get them in every dialect;
    a request's own values win."""
    app, pool = pool_app(models)
    pool.specs[0] = dataclasses.replace(
        pool.specs[0], sampling={"temperature": 0.0, "max_tokens": 3}
    )
    with serve_in_thread(app) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
        messages = [{"role": "user", "content": PROMPTS[0]}]
        first = [client.chat.completions.create(model="m0", messages=messages) for _ in range(2)]
        assert [r.usage.completion_tokens for r in first] == [3, 3]
        assert first[0].choices[0].message.content == first[1].choices[0].message.content
        assert first[0].choices[0].message.content == _chat(client, "m0", PROMPTS[0], n=3)
        own = client.chat.completions.create(model="m0", messages=messages, max_tokens=6)
        assert own.usage.completion_tokens == 6
        r = ollama.Client(host=base).generate(model="m0", prompt="Hello")
        assert r.eval_count == 3
        r = ollama.Client(host=base).generate(
            model="m0", prompt="Hello", options={"num_predict": 5}
        )
        assert r.eval_count == 5
        other = client.completions.create(model="m1", prompt="Hello", temperature=0)  # no defaults
        assert other.usage.completion_tokens > 3


def test_a_model_whose_engine_died_is_loaded_again(models, monkeypatch):
    """A failure that is no allocation failure stops that model's engine (its request gets a
    500); the next request to it loads it afresh, and the other models never noticed."""
    from mlxrun import memory

    armed = {"on": False}

    def allocation_point(tokens: int) -> None:
        if armed["on"]:
            armed["on"] = False
            raise RuntimeError("a bug, not memory")

    monkeypatch.setattr(memory, "allocation_point", allocation_point)
    app, pool = pool_app(models)
    with serve_in_thread(app) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
        _chat(client, "m0", PROMPTS[0])
        _chat(client, "m1", PROMPTS[0])
        armed["on"] = True
        with pytest.raises(openai.InternalServerError):
            _chat(client, "m0", PROMPTS[1])
        assert not pool.slots["m0"].state.engine.is_alive
        assert _chat(client, "m1", PROMPTS[1])  # untouched
        assert _chat(client, "m0", PROMPTS[1])  # loaded again
        assert _metric(base, "model_loads_total", "m0") == 2
