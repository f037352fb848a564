"""Concurrency, client disconnects and overload against a real server and engine."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import openai
import pytest

from serverutil import MODEL_ID, make_app, serve_in_thread

pytestmark = pytest.mark.server

MESSAGES = [{"role": "user", "content": "Count to ten."}]


@pytest.fixture(scope="module")
def base_url(tiny_llama):
    with serve_in_thread(make_app(tiny_llama, max_running=16)) as url:
        yield url


def _gauge(base_url: str, name: str) -> float:
    for line in httpx.get(base_url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def _long(base_url: str, **body) -> dict:
    """A request that runs to max_tokens: " the" forced, so no early end-of-sequence."""
    ids = httpx.post(base_url + "/tokenize", json={"prompt": " the", "add_special_tokens": False})
    (the,) = ids.json()["tokens"]
    return {"messages": MESSAGES, "logit_bias": {str(the): 100}, **body}


def _wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_sixteen_concurrent_streams(base_url):
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0)
    alone = client.chat.completions.create(
        model=MODEL_ID, messages=MESSAGES, temperature=0, max_tokens=8
    )

    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[str, str | None]:
        stream = await client.chat.completions.create(
            model=MODEL_ID, messages=MESSAGES, temperature=0, max_tokens=8, stream=True
        )
        parts, finish = [], None
        async for chunk in stream:
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
        return "".join(parts), finish

    async def main() -> list[tuple[str, str | None]]:
        client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0)
        try:
            return await asyncio.gather(*(one(client, i) for i in range(16)))
        finally:
            await client.close()

    results = asyncio.run(main())
    assert len(results) == 16
    assert all(r == (alone.choices[0].message.content, "length") for r in results)
    _wait_for(lambda: _gauge(base_url, "mlxrun_requests_running") == 0)


def test_disconnect_mid_stream_aborts_and_serving_goes_on(base_url):
    aborted = _gauge(base_url, "mlxrun_aborted_requests_total")
    body = _long(base_url, model=MODEL_ID, max_tokens=400, stream=True)
    with httpx.stream("POST", base_url + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(3)]
    assert got[0].startswith("data: ")
    # The engine drops the request within a few steps, long before 400 tokens.
    _wait_for(lambda: _gauge(base_url, "mlxrun_requests_running") == 0, timeout=10)
    assert _gauge(base_url, "mlxrun_aborted_requests_total") == aborted + 1
    r = httpx.post(
        base_url + "/v1/chat/completions",
        json={"model": MODEL_ID, "messages": MESSAGES, "max_tokens": 3, "temperature": 0},
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_disconnect_during_non_streaming_request_aborts(base_url):
    aborted = _gauge(base_url, "mlxrun_aborted_requests_total")
    body = _long(base_url, model=MODEL_ID, max_tokens=450)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(base_url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(5, read=0.5))
    _wait_for(lambda: _gauge(base_url, "mlxrun_aborted_requests_total") == aborted + 1, timeout=10)
    _wait_for(lambda: _gauge(base_url, "mlxrun_requests_running") == 0, timeout=10)


def test_overload_is_429_with_retry_after(tiny_llama):
    app = make_app(tiny_llama, max_running=1, max_waiting=0, model_id="busy")
    with serve_in_thread(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        body = _long(url, model="busy", max_tokens=450, stream=True)
        started = threading.Event()

        def hold() -> None:
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
                lines = r.iter_lines()  # kept: dropping the iterator would close the stream
                next(lines)
                started.set()
                time.sleep(1.5)

        holder = threading.Thread(target=hold)
        holder.start()
        assert started.wait(30)
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(model="busy", messages=MESSAGES, max_tokens=2)
        assert info.value.response.headers["retry-after"] == "1"
        assert info.value.body["code"] == "rate_limit_exceeded"
        r = httpx.post(
            url + "/v1/completions", json={"model": "busy", "prompt": "x", "max_tokens": 1}
        )
        assert r.status_code == 429
        holder.join()
        # The holder went away: its slot is free again.
        _wait_for(lambda: _gauge(url, "mlxrun_requests_running") == 0)
        r = client.chat.completions.create(model="busy", messages=MESSAGES, max_tokens=2)
        assert r.usage.completion_tokens == 2
