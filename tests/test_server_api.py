"""The OpenAI API as clients use it: the official `openai` client against a real server (uvicorn on
a loopback port, the real engine, a tiny random-weight model: gibberish text, so greedy decoding
and short outputs)."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from serverutil import MODEL_ID, make_app, serve_in_thread

pytestmark = pytest.mark.server

GREEDY = {"temperature": 0, "max_tokens": 8}
MESSAGES = [{"role": "user", "content": "Write a function that adds two numbers."}]


@pytest.fixture(scope="module")
def base_url(tiny_llama):
    with serve_in_thread(make_app(tiny_llama, aliases=("tiny-alias",))) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)


def _chat(client, **kw):
    return client.chat.completions.create(
        **{"model": MODEL_ID, "messages": MESSAGES, **GREEDY, **kw}
    )


def _complete(client, **kw):
    return client.completions.create(
        **{"model": MODEL_ID, "prompt": "def add(a, b):", **GREEDY, **kw}
    )


# ---------------------------------------------------------------- models


def test_models_list_and_get(client):
    models = client.models.list()
    ids = [m.id for m in models.data]
    assert ids == [MODEL_ID, "tiny-alias"]
    card = client.models.retrieve(MODEL_ID)
    assert card.owned_by == "mlxrun" and card.object == "model"
    extra = card.model_extra
    assert extra["context_length"] == 512 and extra["max_output_tokens"] == 511  # 1-token prompt
    assert extra["capabilities"]["fim"] is True  # the fixture's BPE vocab has <|fim_*|>
    caps = extra["capabilities"]
    assert caps["tools"] is True and caps["json_schema"] is True  # ChatML template with tools
    assert caps["reasoning"] is False
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("no-such-model")
    assert info.value.body["code"] == "model_not_found"


# ---------------------------------------------------------------- chat


def test_chat_completion_shape_and_usage(client):
    r = _chat(client)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == MODEL_ID
    (choice,) = r.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason == "length" and choice.logprobs is None
    assert r.usage.completion_tokens == 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8
    assert r.usage.prompt_tokens_details.cached_tokens >= 0
    # Same request, same greedy text; an alias reaches the same model.
    assert _chat(client, model="tiny-alias").choices[0].message.content == choice.message.content


def test_prompt_cache_is_reported(client):
    long = [{"role": "user", "content": "cache me " * 40}]
    first = client.chat.completions.create(model=MODEL_ID, messages=long, **GREEDY)
    second = client.chat.completions.create(model=MODEL_ID, messages=long, **GREEDY)
    assert second.usage.prompt_tokens == first.usage.prompt_tokens > 40
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 1


def test_content_parts_equal_plain_string(client):
    text = MESSAGES[0]["content"]
    parts = [{"role": "user", "content": [{"type": "text", "text": text}]}]
    r = client.chat.completions.create(model=MODEL_ID, messages=parts, **GREEDY)
    assert r.choices[0].message.content == _chat(client).choices[0].message.content


def test_max_tokens_and_max_completion_tokens(client):
    assert _chat(client, max_tokens=3).usage.completion_tokens == 3
    r = _chat(client, max_tokens=None, max_completion_tokens=5)
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"


def test_stop_string_really_stops(client, base_url):
    full = _chat(client, max_tokens=16).choices[0].message.content
    # A stop string taken from the greedy output: the text must end right before it.
    at = next(i for i in range(2, len(full) - 2) if "\ufffd" not in full[i : i + 2])
    stop = full[at : at + 2]
    cut = full.index(stop)
    aborted = _metric(base_url, "mlxrun_aborted_requests_total")
    r = _chat(client, max_tokens=16, stop=[stop, "\x00never"])
    assert r.choices[0].message.content == full[:cut]
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 16
    assert _metric(base_url, "mlxrun_aborted_requests_total") == aborted + 1
    # A single string works too, and streaming cuts at the same place.
    stream = _chat(client, max_tokens=16, stop=stop, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full[:cut] and chunks[-1].choices[0].finish_reason == "stop"


def test_streaming_frames(client):
    full = _chat(client).choices[0].message.content
    chunks = list(_chat(client, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    first, last_choice, usage_chunk = chunks[0], chunks[-2], chunks[-1]
    assert first.choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:-1])
    assert [c.choices[0].finish_reason for c in chunks[:-1]].count("length") == 1
    assert last_choice.choices[0].finish_reason == "length"
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == 8
    assert all(c.usage is None for c in chunks[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == full


def test_stream_without_usage_and_done_marker(base_url):
    body = {"model": MODEL_ID, "messages": MESSAGES, "stream": True, **GREEDY}
    with httpx.stream("POST", base_url + "/v1/chat/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: {") for line in lines[:-1])
    assert '"usage"' not in "".join(lines)


def test_n_choices(client):
    r = _chat(client, n=3, temperature=1.0, seed=5, max_tokens=6)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.completion_tokens == 18
    assert len({c.message.content for c in r.choices}) > 1  # different seeds per choice
    chunks = list(_chat(client, n=2, stream=True))
    for i in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == i]
        assert mine[0].delta.role == "assistant" and mine[-1].finish_reason == "length"


def test_seed_reproducible_and_temperature_matters(client):
    a = _chat(client, temperature=1.0, seed=1234, max_tokens=10).choices[0].message.content
    b = _chat(client, temperature=1.0, seed=1234, max_tokens=10).choices[0].message.content
    c = _chat(client, temperature=1.0, seed=99, max_tokens=10).choices[0].message.content
    assert a == b and a != c


def test_top_p_keeps_only_the_top_token(client):
    greedy = _chat(client, max_tokens=10).choices[0].message.content
    tiny_p = _chat(client, temperature=1.0, top_p=1e-9, seed=3, max_tokens=10)
    assert tiny_p.choices[0].message.content == greedy


def test_logprobs_in_chat(client):
    r = _chat(client, logprobs=True, top_logprobs=3, max_tokens=4)
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)  # greedy: the top
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    streamed = list(_chat(client, logprobs=True, top_logprobs=2, max_tokens=4, stream=True))
    got = [
        e
        for c in streamed
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert [e.token for e in got] == [e.token for e in content]
    assert all(len(e.top_logprobs) == 2 for e in got)


def test_penalties_and_logit_bias(client, base_url):
    def token_bytes(**kw) -> list[tuple[int, ...]]:
        r = _chat(client, max_tokens=12, logprobs=True, **kw)
        return [tuple(e.bytes) for e in r.choices[0].logprobs.content]

    # Random weights give nearly flat logits: a penalty of 2 forbids any repeat under greedy.
    plain = token_bytes()
    assert len(set(plain)) < 12  # greedy alone repeats itself here
    assert len(set(token_bytes(presence_penalty=2))) == 12
    assert len(set(token_bytes(frequency_penalty=2))) == 12

    def one_id(text: str) -> int:
        body = {"prompt": text, "add_special_tokens": False}
        (token,) = httpx.post(base_url + "/tokenize", json=body).json()["tokens"]
        return token

    the, a = one_id(" the"), one_id(" a")
    r = _chat(client, max_tokens=4, logit_bias={str(the): 100, str(a): 99})
    assert r.choices[0].message.content == " the" * 4
    r = _chat(client, max_tokens=4, logit_bias={str(the): -100, str(a): 99})
    assert r.choices[0].message.content == " a" * 4


def test_null_optionals_and_user(client, base_url):
    body = {"model": MODEL_ID, "messages": MESSAGES, "max_tokens": 2, "temperature": None,
            "top_p": None, "n": None, "stop": None, "seed": None, "logit_bias": None,
            "stream": None, "stream_options": None, "tools": None, "user": "someone"}  # fmt: skip
    r = httpx.post(base_url + "/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    # Sampled (temperature null = the default) from random weights: an early end-of-turn is fine.
    out = r.json()
    finish = out["choices"][0]["finish_reason"]
    assert (finish, out["usage"]["completion_tokens"]) == ("length", 2) or finish == "stop"


def test_async_client(base_url):
    async def main() -> list[str]:
        client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0)
        replies = await asyncio.gather(
            *(
                client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, **GREEDY)
                for _ in range(3)
            )
        )
        stream = await client.chat.completions.create(
            model=MODEL_ID, messages=MESSAGES, stream=True, **GREEDY
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        await client.close()
        return [r.choices[0].message.content for r in replies] + [text]

    texts = asyncio.run(main())
    assert len(set(texts)) == 1


# ---------------------------------------------------------------- completions


def test_completion_prompt_forms(client, base_url):
    text = _complete(client).choices[0].text
    ids = httpx.post(base_url + "/tokenize", json={"prompt": "def add(a, b):"}).json()["tokens"]
    assert _complete(client, prompt=ids).choices[0].text == text
    r = _complete(client, prompt=["def add(a, b):", "class A:"])
    assert [c.index for c in r.choices] == [0, 1] and r.choices[0].text == text
    r = _complete(client, prompt=[ids, ids[:3]], n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text == text
    assert r.usage.prompt_tokens == len(ids) + 3 and r.usage.completion_tokens == 32
    assert r.object == "text_completion" and r.id.startswith("cmpl-")


def test_completion_default_max_tokens_is_16(client):
    r = client.completions.create(model=MODEL_ID, prompt="x", temperature=0)
    assert r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"


def test_completion_echo_logprobs_and_stream(client):
    base = _complete(client).choices[0].text
    assert _complete(client, echo=True).choices[0].text == "def add(a, b):" + base
    r = _complete(client, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 8
    assert all(len(top) <= 2 for top in lp.top_logprobs) and lp.text_offset[0] == 0
    chunks = list(_complete(client, stream=True, echo=True))
    assert chunks[0].choices[0].text == "def add(a, b):"
    assert "".join(c.choices[0].text for c in chunks) == "def add(a, b):" + base
    assert chunks[-1].choices[0].finish_reason == "length"
    streamed = list(
        _complete(client, stream=True, logprobs=1, stream_options={"include_usage": True})
    )
    assert streamed[-1].usage.completion_tokens == 8 and streamed[-1].choices == []
    tokens = [t for c in streamed[:-1] for t in c.choices[0].logprobs.tokens]
    assert tokens == lp.tokens


def test_completion_stop(client):
    full = _complete(client, max_tokens=16).choices[0].text
    at = next(i for i in range(2, len(full) - 2) if "\ufffd" not in full[i : i + 2])
    r = _complete(client, max_tokens=16, stop=full[at : at + 2])
    assert r.choices[0].text == full[: full.index(full[at : at + 2])]
    assert r.choices[0].finish_reason == "stop"


def test_fim_suffix(client):
    r = _complete(client, prompt="def add(a, b):\n    return ", suffix="\n\nprint(add(1, 2))")
    plain = _complete(client, prompt="def add(a, b):\n    return ")
    assert r.usage.prompt_tokens > plain.usage.prompt_tokens  # FIM tokens + suffix were added
    assert r.choices[0].finish_reason in ("length", "stop")


# ---------------------------------------------------------------- ops


def test_health_tokenize_detokenize(base_url):
    assert httpx.get(base_url + "/health").json() == {"status": "ok", "model": MODEL_ID}
    r = httpx.post(base_url + "/tokenize", json={"model": MODEL_ID, "prompt": "hello world"})
    ids = r.json()["tokens"]
    assert r.json()["count"] == len(ids) > 0 and r.json()["max_model_len"] == 512
    assert (
        httpx.post(base_url + "/detokenize", json={"tokens": ids}).json()["prompt"] == "hello world"
    )
    chat = httpx.post(base_url + "/tokenize", json={"messages": MESSAGES}).json()
    assert chat["count"] > len(ids)
    assert (
        httpx.post(base_url + "/tokenize", json={"prompt": "x", "model": "nope"}).status_code == 404
    )
    assert httpx.post(base_url + "/detokenize", json={"tokens": [10**9]}).status_code == 400


def _metric(base_url: str, name: str, labels: str = "") -> float:
    text = httpx.get(base_url + "/metrics").text
    for line in text.splitlines():
        if line.startswith(name + labels + " ") or line.startswith(name + labels + "{") and labels:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_exposition(base_url, client):
    _chat(client)
    r = httpx.get(base_url + "/metrics")
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = r.text
    for name in ("mlxrun_requests_total{", "mlxrun_prompt_tokens_total", "mlxrun_generation_tokens_total",
                 "mlxrun_time_to_first_token_seconds_bucket", "mlxrun_inter_token_latency_seconds_bucket",
                 "mlxrun_queue_depth", "mlxrun_prefix_cache_hit_ratio", "mlxrun_memory_active_bytes"):  # fmt: skip
        assert name in text, name
    assert _metric(base_url, "mlxrun_time_to_first_token_seconds_count") >= 1
    assert _metric(base_url, "mlxrun_generation_tokens_total") >= 8
    ok = _metric(
        base_url, "mlxrun_requests_total", '{endpoint="/v1/chat/completions",status="200"}'
    )
    assert ok >= 1
