"""The output-token budget: one rule (mlxrun.budget) for every dialect and the engine.

A prompt that does not fit is a 400 in the client's dialect; a max_tokens past what the context
leaves is clamped to it (X-Mlxrun-Max-Tokens-Clamped: requested->granted, and a debug log line);
--strict keeps OpenAI's 400 on OpenAI's routes; /v1/models advertises what a request can get.
"""

from __future__ import annotations

import logging

import anthropic
import httpx
import ollama
import openai
import pytest

from mlxrun.budget import (
    TERMINAL_MAX_TOKENS,
    Budget,
    chat_reply_default,
    max_output,
    output_budget,
    prompt_room,
)
from mlxrun.errors import ContextLengthExceededError, InvalidRequestError
from serverutil import MODEL_ID, make_app, serve_in_thread

CONTEXT = 512
CLAMP = "x-mlxrun-max-tokens-clamped"
GREEDY = {"temperature": 0}


# ---------------------------------------------------------------- the rule


@pytest.mark.pure
def test_prompt_that_does_not_fit_is_an_error_whatever_max_tokens_says():
    for requested in (None, 1, 10**6):
        with pytest.raises(ContextLengthExceededError) as info:
            output_budget(512, requested, 512, prompt_param="messages")
        assert info.value.param == "messages" and info.value.max_tokens is None


@pytest.mark.pure
def test_unset_max_tokens_gets_what_is_left_or_the_default():
    assert output_budget(100, None, 512) == Budget(412, None)
    assert output_budget(100, None, 512, default=16) == Budget(16, None)
    assert output_budget(500, None, 512, default=16) == Budget(12, None)  # default past the end
    assert output_budget(100, None, None).granted == 4096  # nothing bounds it: the fallback
    assert output_budget(100, None, 512, cap=50) == Budget(50, None)


@pytest.mark.pure
def test_max_tokens_past_the_context_is_clamped_and_says_so():
    budget = output_budget(100, 500, 512)
    assert budget == Budget(412, 500) and budget.clamped and budget.describe() == "500->412"
    fits = output_budget(100, 412, 512)
    assert fits.granted == 412 and not fits.clamped
    capped = output_budget(100, 300, 512, cap=64)
    assert capped.granted == 64 and capped.clamped


@pytest.mark.pure
def test_strict_keeps_the_errors():
    with pytest.raises(ContextLengthExceededError) as info:
        output_budget(100, 500, 512, strict=True, param="max_completion_tokens")
    err = info.value
    assert (err.prompt_tokens, err.max_tokens, err.limit) == (100, 500, 512)
    assert err.param == "max_completion_tokens"
    with pytest.raises(InvalidRequestError):
        output_budget(100, 300, 512, cap=64, strict=True)
    with pytest.raises(InvalidRequestError):
        output_budget(10, 0, 512)


@pytest.mark.pure
def test_advertised_maximum_is_one_a_request_can_get():
    most = max_output(512)
    assert most == 511
    assert not output_budget(1, most, 512, strict=True).clamped  # a one-token prompt gets it all
    assert max_output(512, cap=64) == 64


@pytest.mark.pure
def test_the_terminal_and_fim_defaults_live_here_too():
    assert TERMINAL_MAX_TOKENS == 256
    assert chat_reply_default(8192) == 256  # generate and chat: the terminal cap
    assert chat_reply_default(300) == 150  # chat: at most half the context
    assert chat_reply_default(1) is None
    assert prompt_room(1000, 100) == 900  # FIM trims its context to leave max_tokens
    assert prompt_room(1000, None) == 750  # or a quarter of the context
    assert prompt_room(1000, None, cap=64) == 936


# ---------------------------------------------------------------- every dialect


@pytest.fixture(scope="module")
def base_url(tiny_llama):
    with serve_in_thread(make_app(tiny_llama, context=CONTEXT)) as url:
        yield url


@pytest.fixture(scope="module")
def strict_url(tiny_llama):
    with serve_in_thread(make_app(tiny_llama, context=CONTEXT, strict=True)) as url:
        yield url


def _count(base_url: str, **body) -> int:
    return httpx.post(base_url + "/tokenize", json=body).json()["count"]


def _near_the_end(base_url: str, leave: int) -> str:
    """A user message whose chat prompt leaves about `leave` tokens of the context."""
    per = _count(base_url, prompt=" x" * 101) - _count(base_url, prompt=" x" * 100)
    base = _count(base_url, messages=[{"role": "user", "content": " x" * 100}])
    return " x" * (100 + (CONTEXT - leave - base) // per)


@pytest.mark.server
def test_models_advertise_what_a_request_can_get(strict_url):
    client = openai.OpenAI(base_url=strict_url + "/v1", api_key="x", max_retries=0)
    most = client.models.retrieve(MODEL_ID).model_extra["max_output_tokens"]
    assert most == CONTEXT - 1
    # Even under --strict, a request for the advertised maximum is accepted.
    with client.completions.with_streaming_response.create(
        model=MODEL_ID, prompt=[5], max_tokens=most, stream=True
    ) as r:
        assert r.status_code == 200


@pytest.mark.server
def test_openai_clamps_with_a_header_and_a_log_line(base_url, caplog):
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0)
    content = _near_the_end(base_url, leave=12)
    messages = [{"role": "user", "content": content}]
    prompt = _count(base_url, messages=messages)
    room = CONTEXT - prompt
    with caplog.at_level(logging.DEBUG, logger="mlxrun"):
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL_ID, messages=messages, max_tokens=4096, **GREEDY
        )
    assert raw.headers[CLAMP] == f"4096->{room}"
    reply = raw.parse()
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.prompt_tokens + reply.usage.completion_tokens == CONTEXT
    assert any("clamped" in r.getMessage() and f"4096->{room}" in r.getMessage()
               for r in caplog.records)  # fmt: skip
    fits = client.chat.completions.with_raw_response.create(
        model=MODEL_ID, messages=messages, max_tokens=2, **GREEDY
    )
    assert CLAMP not in fits.headers


@pytest.mark.server
def test_ollama_num_predict_is_clamped_not_refused(base_url):
    content = _near_the_end(base_url, leave=10)
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": content}],
            "stream": False, "options": {"temperature": 0, "num_predict": 10_000_000}}  # fmt: skip
    r = httpx.post(base_url + "/api/chat", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers[CLAMP].startswith("10000000->")
    reply = r.json()
    assert reply["done_reason"] == "length"
    assert reply["prompt_eval_count"] + reply["eval_count"] == CONTEXT
    client = ollama.Client(host=base_url)
    again = client.chat(MODEL_ID, messages=body["messages"], options=body["options"])
    assert again.eval_count == reply["eval_count"]


@pytest.mark.server
def test_anthropic_clamps_too(base_url):
    content = _near_the_end(base_url, leave=10)
    client = anthropic.Anthropic(base_url=base_url, api_key="x", max_retries=0)
    args = {"model": MODEL_ID, "messages": [{"role": "user", "content": content}]}
    # 64000 is what Claude Code asks for; the SDK wants a stream for it.
    with client.messages.stream(max_tokens=64_000, extra_body=GREEDY, **args) as stream:
        m = stream.get_final_message()
        assert stream.response.headers[CLAMP].startswith("64000->")
    assert m.stop_reason == "model_context_window_exceeded"
    u = m.usage
    total = u.input_tokens + u.cache_read_input_tokens + u.cache_creation_input_tokens
    assert total + u.output_tokens == CONTEXT


@pytest.mark.server
def test_a_prompt_that_does_not_fit_is_a_400_in_each_dialect(base_url):
    huge = " word" * (2 * CONTEXT)
    messages = [{"role": "user", "content": huge}]
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=1)
    assert info.value.code == "context_length_exceeded"
    claude = anthropic.Anthropic(base_url=base_url, api_key="x", max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as info:
        claude.messages.create(model=MODEL_ID, max_tokens=1, messages=messages)
    assert info.value.body["error"]["message"].startswith("prompt is too long")
    with pytest.raises(ollama.ResponseError) as info:
        ollama.Client(host=base_url).chat(MODEL_ID, messages=messages)
    assert info.value.status_code == 400 and "context length" in info.value.error


@pytest.mark.server
def test_legacy_completions_default_is_the_budget_rules_default(strict_url):
    """/v1/completions without max_tokens gets OpenAI's 16 through mlxrun.budget's `default`,
    not as if the client had asked for 16: near the end of the context it shrinks to what is
    left, even under --strict, and nothing is reported as clamped."""
    client = openai.OpenAI(base_url=strict_url + "/v1", api_key="x", max_retries=0)
    raw = client.completions.with_raw_response.create(
        model=MODEL_ID, prompt=list(range(10, 10 + CONTEXT - 5)), temperature=0
    )
    assert raw.status_code == 200 and CLAMP not in raw.headers
    r = raw.parse()
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
    roomy = client.completions.create(model=MODEL_ID, prompt=[5, 6, 7], temperature=0)
    assert roomy.usage.completion_tokens == 16


@pytest.mark.server
def test_strict_keeps_openais_400_only_on_openais_routes(strict_url):
    client = openai.OpenAI(base_url=strict_url + "/v1", api_key="x", max_retries=0)
    ids = list(range(10, 110))  # 100 prompt tokens
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL_ID, prompt=ids, max_tokens=500)
    assert info.value.code == "context_length_exceeded" and info.value.param == "max_tokens"
    for number in ("512", "100", "500", "600"):
        assert number in info.value.message
    # Anthropic's and Ollama's own rules clamp (neither API refuses a large budget).
    content = _near_the_end(strict_url, leave=10)
    body = {
        "model": MODEL_ID,
        "max_tokens": 64_000,
        "messages": [{"role": "user", "content": content}],
    }
    r = httpx.post(strict_url + "/v1/messages", json={**body, **GREEDY}, timeout=60)
    assert r.status_code == 200 and r.headers[CLAMP].startswith("64000->")
    infill = {
        "input_prefix": "def add(a, b):\n",
        "input_suffix": "\n",
        "n_predict": 10**6,
        "temperature": 0,
        "t_max_predict_ms": 1,
    }  # llama-server never refuses n_predict
    r = httpx.post(strict_url + "/infill", json=infill, timeout=60)
    assert r.status_code == 200 and r.headers[CLAMP].startswith("1000000->")
