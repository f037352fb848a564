"""Every error class over real HTTP (raw httpx for malformed input), and a fuzz of request bodies
asserting the server never answers 5xx and keeps serving."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.routing import Route

from mlxrun.server.errors import EXCEPTION_HANDLERS, guarded
from serverutil import MODEL_ID, make_app, serve_in_thread

pytestmark = pytest.mark.server

MAX_BODY = 256 << 10
CHAT = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def base_url(tiny_llama):
    with serve_in_thread(make_app(tiny_llama, max_body_bytes=MAX_BODY)) as url:
        yield url


@pytest.fixture(scope="module")
def http(base_url):
    with httpx.Client(base_url=base_url, timeout=60) as client:
        yield client


def _error(r: httpx.Response, status: int, param: object = ..., code: object = ...) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} or "status" in body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not ...:
        assert err["param"] == param, err
    if code is not ...:
        assert err["code"] == code, err
    return err


@pytest.mark.parametrize(
    "raw", [b"{", b"not json", b"\xff\xfe", b"[1, 2]", b'{"model": NaN}', b"", b"[" * 5000]
)
def test_malformed_bodies(http, raw):
    err = _error(http.post("/v1/chat/completions", content=raw), 400)
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"model": None}, "model"),
        ({"messages": None}, "messages"),
        ({"temperature": "0.5"}, "temperature"),
        ({"temperature": 3.5}, "temperature"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"top_logprobs": 5}, "top_logprobs"),
        ({"logit_bias": {"1": 1000}}, "logit_bias"),
        ({"logit_bias": {"999999": 1}}, "logit_bias"),  # outside the vocabulary
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
         "messages[0].content[0].type"),
        ({"tools": [{"type": "function", "function": {"name": "f g"}}]},
         "tools[0].function.name"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"if": {"type": "string"}, "then": {}}}}},
         "response_format"),
        ({"store": True}, "store"),  # known, but asks for what we do not do: refused
    ],
)  # fmt: skip
def test_invalid_chat_fields(http, patch, param):
    err = _error(http.post("/v1/chat/completions", json={**CHAT, **patch}), 400, param)
    if param == "response_format":
        assert "not supported" in err["message"] and "if" in err["message"]


def test_unknown_model_is_404(http):
    for path, body in [
        ("/v1/chat/completions", {**CHAT, "model": "gpt-4"}),
        ("/v1/completions", {"model": "gpt-4", "prompt": "x"}),
    ]:
        err = _error(http.post(path, json=body), 404, "model", "model_not_found")
        assert "gpt-4" in err["message"]
    _error(http.get("/v1/models/gpt-4"), 404, code="model_not_found")


def test_context_overflow_names_both_numbers(http):
    ids = list(range(10, 500))  # 490 prompt tokens; the context is 512
    r = http.post("/v1/completions", json={"model": MODEL_ID, "prompt": ids, "max_tokens": 500})
    # Not --strict: max_tokens past the context is clamped to what is left, and said so.
    assert r.status_code == 200 and r.headers["x-mlxrun-max-tokens-clamped"] == "500->22"
    assert r.json()["usage"]["completion_tokens"] <= 22
    r = http.post("/v1/completions", json={"model": MODEL_ID, "prompt": list(range(10, 610))})
    err = _error(r, 400, "prompt", "context_length_exceeded")
    assert "600" in err["message"] and "512" in err["message"]
    long_chat = {
        **CHAT,
        "messages": [{"role": "user", "content": "word " * 600}],
        "max_tokens": None,
    }
    _error(
        http.post("/v1/chat/completions", json=long_chat),
        400,
        "messages",
        "context_length_exceeded",
    )
    fits = {"model": MODEL_ID, "prompt": ids, "max_tokens": 22, "temperature": 0}
    assert http.post("/tokenize", json={"prompt": "x"}).status_code == 200
    # Exactly at the limit is accepted (and stopped after 1 token here to stay fast).
    assert http.post("/v1/completions", json={**fits, "max_tokens": 1}).status_code == 200


def test_completion_input_errors(http):
    base = {"model": MODEL_ID, "max_tokens": 2}
    _error(http.post("/v1/completions", json={**base, "prompt": [5, 10**6]}), 400, "prompt")
    _error(http.post("/v1/completions", json={**base, "prompt": [[1], [-3]]}), 400, "prompt[1]")
    _error(http.post("/v1/completions", json={**base, "prompt": ""}), 400, "prompt")
    r = http.post("/v1/completions", json={**base, "prompt": "x", "echo": True, "logprobs": 1})
    _error(r, 400, "echo", "unsupported_parameter")
    r = http.post("/v1/completions", json={**base, "prompt": [1, 2], "suffix": "y"})
    _error(r, 400, "suffix")


def test_body_size_limit_is_413(http):
    big = json.dumps({**CHAT, "messages": [{"role": "user", "content": "x" * MAX_BODY}]})
    _error(http.post("/v1/chat/completions", content=big), 413, code="request_too_large")

    def chunks():  # no Content-Length: the limit holds while reading
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(MAX_BODY // 1024 + 1):
            yield b"y" * 1024
        yield b'"}'

    _error(http.post("/v1/completions", content=chunks()), 413)


def test_unknown_route_and_method(http):
    _error(http.get("/v1/nothing"), 404, code="not_found")
    _error(http.get("/v1/chat/completions"), 405, code="method_not_allowed")


def test_not_ready_is_503(tiny_llama):
    """An app whose lifespan has not run: the engine is not started, /health says so."""
    app = make_app(tiny_llama)

    async def main() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)  # no lifespan: the engine never starts
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return [
                await client.get("/health"),
                await client.post("/v1/chat/completions", json=CHAT),
            ]

    health, chat = asyncio.run(main())
    assert health.json()["status"] == "loading"
    _error(health, 503, code="model_loading")
    _error(chat, 503, code="model_loading")
    assert chat.headers["retry-after"] == "1"


def test_stopped_engine_is_503_not_ok(tiny_llama):
    """If the engine thread goes away after start, /health and requests say so instead of 'ok'."""
    app = make_app(tiny_llama)
    with serve_in_thread(app) as url:
        assert httpx.get(url + "/health").status_code == 200
        app.state.server.engine.shutdown()
        _error(httpx.get(url + "/health"), 503, code="engine_stopped")
        _error(httpx.post(url + "/v1/chat/completions", json=CHAT), 503, code="engine_stopped")


def test_internal_error_is_a_500_object_and_serving_goes_on():
    @guarded
    async def broken(request):
        raise RuntimeError("boom")

    @guarded
    async def fine(request):
        from starlette.responses import JSONResponse

        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/broken", broken), Route("/fine", fine)],
                    exception_handlers=EXCEPTION_HANDLERS)  # fmt: skip

    async def main() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return [await client.get("/broken"), await client.get("/fine")]

    broken_r, fine_r = asyncio.run(main())
    err = _error(broken_r, 500, code="internal_error")
    assert err["type"] == "server_error" and "boom" not in err["message"]
    assert fine_r.json() == {"ok": True}


# ---------------------------------------------------------------- fuzz over HTTP

_scalar = (
    st.none()
    | st.booleans()
    | st.integers(-5, 10**12)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6)
)
_json = st.recursive(
    _scalar,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
_message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "system", "assistant", "tool", "x"]),
        "content": _json | st.text(max_size=20),
    }
)
_field_values = {
    "messages": st.lists(_message, max_size=3) | _json,
    "prompt": st.text(max_size=20) | st.lists(st.integers(-2, 2000), max_size=5) | _json,
    "max_tokens": st.integers(-2, 3) | _json,
    "n": st.integers(-1, 3) | _json,
    "logprobs": st.booleans() | st.integers(-1, 6) | _json,
    "top_logprobs": st.integers(-1, 21) | _json,
    "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=5) | _json,
    "logit_bias": st.dictionaries(
        st.text(max_size=4) | st.integers(0, 2000).map(str), _json, max_size=3
    ),
    "stream": st.booleans() | _json,
    "echo": st.booleans() | _json,
    "suffix": st.text(max_size=5) | _json,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | _json,
}
_common_fields = [
    "temperature",
    "top_p",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "user",
    "model",
    "best_of",
    "top_k",
]
_bodies = st.fixed_dictionaries(
    {},
    optional={**_field_values, **{name: _json for name in _common_fields}},
)


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=_bodies, path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
def test_fuzzed_requests_never_5xx(http, body, path):
    body = {"model": MODEL_ID, "temperature": 0, **body}
    if not isinstance(body.get("max_tokens"), int) or body["max_tokens"] > 3:
        body.setdefault("max_tokens", 2)  # a valid request must finish quickly
    r = http.post(path, json=body)
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        _error(r, r.status_code)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=st.binary(max_size=64))
def test_fuzzed_bytes_never_5xx(http, raw):
    r = http.post("/v1/completions", content=raw)
    assert r.status_code == 400
    assert http.get("/health").status_code == 200
