"""Fuzzed bodies on every route that parses one, and combinations of fields that interact
(grammar + response_format + tools): whatever comes in, the answer is a 2xx or a 4xx in the
route's own dialect, never a 5xx, and a stream never carries a server error. (OpenAI's chat and
completions bodies are fuzzed field by field in test_server_errors.py.)"""

from __future__ import annotations

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from serverutil import ADD, MODEL_ID, make_app, serve_in_thread

pytestmark = pytest.mark.server

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))

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
_text = st.text(max_size=12)
_small = st.integers(-2, 3)
_unknown = st.dictionaries(st.text(min_size=1, max_size=6), _json, max_size=2)  # vendor fields


def _body(fields: dict) -> st.SearchStrategy[dict]:
    """Any subset of `fields` (each a strategy), plus a few keys nobody knows."""
    known = st.fixed_dictionaries({}, optional=fields)
    return st.tuples(_unknown, known).map(lambda pair: {**pair[0], **pair[1]})


# ---------------------------------------------------------------- Anthropic

_block = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "tool_use", "tool_result", "thinking", "image", "x"])},
    optional={"text": _text | _json, "id": _text, "name": st.sampled_from(["add", "x"]),
              "input": _json, "tool_use_id": _text, "content": _text | _json,
              "thinking": _text, "cache_control": _json},
)  # fmt: skip
_anthropic_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "tool"]) | _json},
    optional={"content": _text | st.lists(_block, max_size=3) | _json, "x": _json},
)
_anthropic_tool = st.fixed_dictionaries(
    {"name": st.sampled_from(["add", "bad name"]) | _json},
    optional={"input_schema": st.just(ADD) | _json, "type": _json, "description": _json},
)
ANTHROPIC = {
    "model": st.just(MODEL_ID) | _json,
    "messages": st.lists(_anthropic_message, max_size=3) | _json,
    "system": _text | st.lists(_block, max_size=2) | _json,
    "max_tokens": _small | _json,
    "tools": st.lists(_anthropic_tool, max_size=2) | _json,
    "tool_choice": st.fixed_dictionaries(
        {"type": st.sampled_from(["auto", "any", "tool", "none", "x"])}, optional={"name": _json}
    )
    | _json,  # fmt: skip
    "thinking": st.fixed_dictionaries(
        {"type": st.sampled_from(["enabled", "adaptive", "disabled"])},
        optional={"budget_tokens": _json},
    )
    | _json,  # fmt: skip
    "output_config": st.fixed_dictionaries({}, optional={"format": _json, "effort": _json}) | _json,
    "stop_sequences": st.lists(_text, max_size=2) | _json,
    "temperature": _json,
    "top_k": _json,
    "stream": st.booleans() | _json,
    "metadata": _json,
    "context_management": _json,
    "cache_control": _json,
}

# ---------------------------------------------------------------- Ollama

_options = st.dictionaries(
    st.sampled_from(["num_predict", "temperature", "top_k", "stop", "num_ctx", "seed",
                     "repeat_last_n", "mirostat", "x"]),
    _json,
    max_size=4,
)  # fmt: skip
_ollama_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "tool", "x"]) | _json},
    optional={"content": _text | _json, "tool_calls": _json, "images": _json, "thinking": _json,
              "tool_name": _json},
)  # fmt: skip
OLLAMA = {
    "model": st.just(MODEL_ID) | _json,
    "messages": st.lists(_ollama_message, max_size=3) | _json,
    "prompt": _text | _json,
    "suffix": _text | _json,
    "system": _text | _json,
    "raw": st.booleans() | _json,
    "format": st.sampled_from(["json", ""]) | st.just(ADD) | _json,
    "options": _options | _json,
    "think": st.sampled_from([True, False, "low", "x"]) | _json,
    "keep_alive": _json,
    "tools": _json,
    "stream": st.booleans() | _json,
    "template": _json,
    "context": _json,
}

# ---------------------------------------------------------------- FIM, tokenize

MISTRAL = {
    "model": st.just(MODEL_ID) | _json,
    "prompt": _text | _json,
    "suffix": _text | _json,
    "max_tokens": _small | _json,
    "min_tokens": _json,
    "random_seed": _json,
    "temperature": _json,
    "stop": _json,
    "stream": st.booleans() | _json,
    "user": _json,
}
INFILL = {
    "input_prefix": _text | _json,
    "input_suffix": _text | _json,
    "input_extra": st.lists(
        st.fixed_dictionaries({}, optional={"filename": _json, "text": _json}), max_size=2
    )
    | _json,  # fmt: skip
    "prompt": _text | _json,
    "n_predict": _small | _json,
    "stream": st.booleans() | _json,
    "logit_bias": _json,
    "response_fields": _json,
    "t_max_predict_ms": _json,
    "grammar": _json,
    "id_slot": _json,
    "cache_prompt": _json,
    "samplers": _json,
}
TOKENIZE = {
    "model": st.just(MODEL_ID) | _json,
    "prompt": _text | _json,
    "content": _text | _json,
    "messages": st.lists(_ollama_message, max_size=2) | _json,
    "add_special_tokens": _json,
    "add_special": _json,
}

# ---------------------------------------------------------------- OpenAI: fields that interact

_tool = {"type": "function", "function": {"name": "add", "parameters": ADD}}
GRAMMAR = 'root ::= "a" | "b"'
# Mostly valid values, so that requests get past each field to where the fields meet.
CHAT_COMBOS = {
    "grammar": st.just(GRAMMAR) | st.just(GRAMMAR) | st.sampled_from(["", "root ::= ("]) | _json,
    "response_format": st.sampled_from(
        [{"type": "json_object"}, {"type": "text"}, "json", 3, ["text"], {"type": 5}]
    )
    | st.just({"type": "json_schema", "json_schema": {"name": "x", "schema": ADD}})
    | _json,
    "tools": st.sampled_from([[_tool], [], None]) | _json,
    "tool_choice": st.sampled_from(["auto", "none", None, "required", {"type": "function"}]),
    "parallel_tool_calls": st.booleans(),
    "n_probs": _small,
    "chat_template_kwargs": st.sampled_from([{"enable_thinking": False}, {}]),
    "reasoning_effort": st.sampled_from(["low", "x"]),
    "stream": st.booleans(),
    "cache_prompt": st.booleans(),
    "repetition_context_size": _small,
}


@pytest.fixture(scope="module")
def http(tiny_llama):
    with serve_in_thread(make_app(tiny_llama, aliases=("claude-*",))) as url:
        with httpx.Client(base_url=url, timeout=120) as client:
            yield client


def _budget(body: dict, name: str, value: int = 2) -> dict:
    """A valid request must finish quickly: a small output budget unless the fuzz chose one."""
    given_value = body.get(name)
    if not isinstance(given_value, int) or isinstance(given_value, bool) or given_value > 3:
        body[name] = value
    return body


def _check(r: httpx.Response, dialect: str) -> None:
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        body = r.json()
        if dialect == "anthropic":
            assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
        elif dialect == "ollama":
            assert isinstance(body["error"], str)
        else:
            assert body["error"]["type"] == "invalid_request_error" and body["error"]["message"]
    else:  # a stream that failed after its headers carries the error as an event
        for marker in ('"server_error"', '"api_error"', '"internal_error"'):
            assert marker not in r.text, r.text


@SETTINGS
@given(body=_body(ANTHROPIC), counting=st.booleans())
def test_anthropic_never_5xx(http, body, counting):
    path = "/v1/messages/count_tokens" if counting else "/v1/messages"
    _check(http.post(path, json=_budget(body, "max_tokens")), "anthropic")


@SETTINGS
@given(body=_body(OLLAMA), chat=st.booleans())
def test_ollama_never_5xx(http, body, chat):
    options = body.setdefault("options", {})
    if isinstance(options, dict):
        _budget(options, "num_predict")
    _check(http.post("/api/chat" if chat else "/api/generate", json=body), "ollama")


@SETTINGS
@given(body=_body(MISTRAL))
def test_mistral_fim_never_5xx(http, body):
    _check(http.post("/v1/fim/completions", json=_budget(body, "max_tokens")), "openai")


@SETTINGS
@given(body=_body(INFILL))
def test_infill_never_5xx(http, body):
    _check(http.post("/infill", json=_budget(body, "n_predict")), "openai")


@SETTINGS
@given(body=_body(TOKENIZE), tokens=st.lists(st.integers(-3, 10**6), max_size=4) | _json)
def test_tokenize_never_5xx(http, body, tokens):
    _check(http.post("/tokenize", json=body), "openai")
    _check(http.post("/detokenize", json={"tokens": tokens, **body}), "openai")


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=st.fixed_dictionaries({}, optional=CHAT_COMBOS), chat=st.booleans())
@example(body={"grammar": GRAMMAR, "response_format": "json"}, chat=True)  # was a 500
@example(body={"grammar": GRAMMAR, "n_probs": 3}, chat=False)  # -inf alternatives: was a 500
def test_grammar_format_and_tools_together_never_5xx(http, body, chat):
    if chat:
        body.update(model=MODEL_ID, messages=[{"role": "user", "content": "hi"}])
        path = "/v1/chat/completions"
    else:
        body.update(model=MODEL_ID, prompt="hi")
        path = "/v1/completions"
    _check(http.post(path, json=_budget(body, "max_tokens")), "openai")
