"""What every route shares, in each route's own dialect: API-key errors (OpenAI, Anthropic and Ollama
shapes, each naming the header its clients send), readiness (every model route is 503 until the
engine runs, as /health says), the request id and access log line, and /tokenize's llama.cpp form."""

from __future__ import annotations

import asyncio
import logging

import anthropic
import httpx
import ollama
import openai
import pytest

from serverutil import MODEL_ID, make_app, serve_in_thread

pytestmark = pytest.mark.server

KEY = "sekret"
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def keyed_url(tiny_llama):
    with serve_in_thread(make_app(tiny_llama, api_key=KEY)) as url:
        yield url


# ---------------------------------------------------------------- auth


def test_anthropic_auth_errors_are_anthropic_shaped(keyed_url):
    url = keyed_url + "/v1/messages/count_tokens"
    body = {"model": MODEL_ID, "messages": USER}
    missing = httpx.post(url, json=body)
    assert missing.status_code == 401
    err = missing.json()
    assert err["type"] == "error" and err["error"]["type"] == "authentication_error"
    assert err["request_id"] == missing.headers["x-request-id"]
    assert "x-api-key" in err["error"]["message"] and "Bearer" not in missing.headers.get(
        "www-authenticate", ""
    )
    wrong = anthropic.Anthropic(base_url=keyed_url, api_key="nope", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as info:
        wrong.messages.count_tokens(model=MODEL_ID, messages=USER)
    assert info.value.body["error"]["type"] == "authentication_error"
    assert "x-api-key" in info.value.body["error"]["message"]
    # Both of Anthropic's ways to send the key work.
    by_key = anthropic.Anthropic(base_url=keyed_url, api_key=KEY, max_retries=0)
    assert by_key.messages.count_tokens(model=MODEL_ID, messages=USER).input_tokens > 0
    by_token = anthropic.Anthropic(base_url=keyed_url, auth_token=KEY, max_retries=0)
    assert by_token.messages.count_tokens(model=MODEL_ID, messages=USER).input_tokens > 0


def test_ollama_auth_errors_are_ollama_shaped(keyed_url):
    with pytest.raises(ollama.ResponseError) as info:
        ollama.Client(host=keyed_url).show(MODEL_ID)
    assert info.value.status_code == 401 and "Authorization: Bearer" in info.value.error
    r = httpx.post(keyed_url + "/api/chat", json={"model": MODEL_ID, "messages": USER})
    assert r.status_code == 401 and set(r.json()) == {"error"}
    assert isinstance(r.json()["error"], str)
    client = ollama.Client(host=keyed_url, headers={"Authorization": f"Bearer {KEY}"})
    assert client.show(MODEL_ID).modelinfo


def test_openai_auth_errors_stay_openai_shaped(keyed_url):
    client = openai.OpenAI(base_url=keyed_url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        client.models.list()
    assert info.value.code == "invalid_api_key"
    missing = httpx.get(keyed_url + "/v1/models")
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert "Authorization: Bearer" in missing.json()["error"]["message"]


def test_unknown_routes_and_methods_answer_in_the_paths_dialect(keyed_url):
    key = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(keyed_url + "/api/nothing", headers=key)
    assert r.status_code == 404 and isinstance(r.json()["error"], str)
    r = httpx.get(keyed_url + "/v1/messages", headers=key)
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"
    assert r.json()["type"] == "error"
    r = httpx.get(keyed_url + "/v1/nothing", headers=key)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


# ---------------------------------------------------------------- readiness


def test_every_model_route_is_503_until_the_engine_runs(tiny_llama):
    """An app whose lifespan has not run (the engine is not started): the routes agree with
    /health, each in its dialect's error shape; the probes still answer."""
    app = make_app(tiny_llama)
    count = {"model": MODEL_ID, "messages": USER}
    calls = [
        ("GET", "/v1/models", None, "openai"),
        ("GET", f"/v1/models/{MODEL_ID}", None, "openai"),
        ("POST", "/tokenize", {"prompt": "x"}, "openai"),
        ("POST", "/detokenize", {"tokens": [1]}, "openai"),
        ("POST", "/v1/chat/completions", {**count, "max_tokens": 1}, "openai"),
        ("POST", "/v1/messages/count_tokens", count, "anthropic"),
        ("POST", "/v1/messages", {**count, "max_tokens": 1}, "anthropic"),
        ("GET", "/api/tags", None, "ollama"),
        ("GET", "/api/ps", None, "ollama"),
        ("POST", "/api/show", {"model": MODEL_ID}, "ollama"),
    ]

    async def main() -> tuple[list[httpx.Response], list[httpx.Response]]:
        transport = httpx.ASGITransport(app=app)  # no lifespan: the engine never starts
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            gated = [await client.request(m, p, json=b) for m, p, b, _ in calls]
            probes = [await client.get(p) for p in ("/health", "/", "/api/version")]
            return gated, probes

    gated, probes = asyncio.run(main())
    for (_, path, _, dialect), r in zip(calls, gated, strict=True):
        assert r.status_code == 503, (path, r.text)
        body = r.json()
        if dialect == "openai":
            assert body["error"]["code"] == "model_loading", path
        elif dialect == "anthropic":
            assert body["type"] == "error" and body["error"]["type"] == "overloaded_error"
        else:
            assert set(body) == {"error"} and "loading" in body["error"]
    health, root, version = probes
    assert health.status_code == 503 and health.json()["status"] == "loading"
    assert root.status_code == 200 and version.status_code == 200


# ---------------------------------------------------------------- request id, access log


def test_access_log_line_per_request_with_its_id(tiny_llama, caplog):
    # The line is written once the app returns, which may be just after the client has its
    # response: read the log after the server has stopped (every request then has ended).
    with caplog.at_level(logging.INFO, logger="mlxrun.access"):
        with serve_in_thread(make_app(tiny_llama)) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
            raw = client.chat.completions.with_raw_response.create(
                model=MODEL_ID, messages=USER, max_tokens=3, temperature=0
            )
            reply = raw.parse()
            missing = httpx.post(url + "/v1/chat/completions", json={"model": "nope"})
    request_id = raw.headers["x-request-id"]
    lines = [r.getMessage() for r in caplog.records if r.name == "mlxrun.access"]
    (line,) = [entry for entry in lines if entry.startswith(request_id + " ")]
    usage = reply.usage
    assert " POST /v1/chat/completions 200 " in line
    assert f"prompt={usage.prompt_tokens} completion={usage.completion_tokens}" in line
    assert line.endswith("s") and line.split()[-1][:-1].replace(".", "").isdigit()
    # An error carries its own id, and the log line says how it ended.
    assert missing.status_code == 400
    (err_line,) = [entry for entry in lines if entry.startswith(missing.headers["x-request-id"])]
    assert " POST /v1/chat/completions 400 " in err_line


# ---------------------------------------------------------------- tokenize, llama.cpp's way


def test_tokenize_accepts_llama_servers_fields(keyed_url):
    headers = {"Authorization": f"Bearer {KEY}"}
    ours = httpx.post(keyed_url + "/tokenize", json={"prompt": "hello world"}, headers=headers)
    theirs = httpx.post(keyed_url + "/tokenize", json={"content": "hello world"}, headers=headers)
    assert theirs.status_code == 200, theirs.text
    ids = ours.json()["tokens"]
    assert theirs.json()["tokens"] == ids
    plain = {"content": "hello", "add_special": False, "with_pieces": True}
    pieces = httpx.post(keyed_url + "/tokenize", json=plain, headers=headers).json()["tokens"]
    assert "".join(p["piece"] for p in pieces) == "hello"
    assert all(isinstance(p["id"], int) for p in pieces)
    back = httpx.post(keyed_url + "/detokenize", json={"tokens": ids}, headers=headers).json()
    assert back["content"] == back["prompt"] == "hello world"
    both = {"content": "a", "prompt": "b"}
    assert httpx.post(keyed_url + "/tokenize", json=both, headers=headers).status_code == 400
