"""Pure tier for the server: request parsing, error objects, SSE framing, metrics text, token bytes."""

from __future__ import annotations

import functools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlxrun.errors import (
    ContextLengthExceededError,
    EngineOverloadedError,
    InsufficientMemoryError,
    InvalidRequestError,
    ModelNotFoundError,
    UnsupportedModelError,
)
from mlxrun.server.errors import APIError, from_mlxrun
from mlxrun.server.metrics import Histogram, Metrics
from mlxrun.server.protocol import parse_chat, parse_completion, parse_json
from mlxrun.server.protocol_anthropic import parse_messages
from mlxrun.server.protocol_ollama import parse_chat as parse_ollama_chat
from mlxrun.server.sse import DONE, event
from mlxrun.server.tokens import _byte_decoder

pytestmark = pytest.mark.pure

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def _error(fn, *args) -> APIError:
    with pytest.raises(APIError) as info:
        fn(*args)
    return info.value


# ---------------------------------------------------------------- JSON


@pytest.mark.parametrize(
    "raw",
    [b"{", b"", b"\xff\xfe{}", b'{"a": NaN}', b'{"a": Infinity}', b'"\\ud800"', b"[" * 100000],
)
def test_bad_json_is_400(raw):
    err = _error(parse_json, raw)
    assert err.status == 400 and err.type == "invalid_request_error"


@pytest.mark.parametrize("raw", [b"[]", b"1", b'"x"', b"null"])
def test_body_must_be_an_object(raw):
    assert "JSON object" in _error(parse_json, raw).message


def test_lone_surrogate_inside_object_is_refused():
    assert _error(parse_json, b'{"prompt": "a\\udc80b"}').status == 400


# ---------------------------------------------------------------- chat


def test_minimal_chat_and_nulls_are_absent():
    nulls = dict.fromkeys(
        ["temperature", "top_p", "n", "stream", "stop", "max_tokens", "logprobs", "seed",
         "logit_bias", "user", "tools", "response_format", "stream_options", "top_logprobs"]
    )  # fmt: skip
    req = parse_chat({**CHAT, **nulls})
    assert req.model == "m" and req.n == 1 and not req.stream
    assert req.messages == [{"role": "user", "content": "hi"}]
    assert req.params.temperature == 1.0 and req.params.max_tokens is None


def test_chat_fields_reach_sampling_params():
    req = parse_chat(
        {**CHAT, "temperature": 0, "top_p": 0.5, "seed": 7, "stop": "END", "presence_penalty": 1,
         "frequency_penalty": -1.5, "logit_bias": {"5": 10, "7": -100}, "logprobs": True,
         "top_logprobs": 3, "max_tokens": 9, "n": 2, "top_k": 4}
    )  # fmt: skip
    p = req.params
    assert (p.temperature, p.top_p, p.seed, p.stop, p.top_k) == (0, 0.5, 7, ("END",), 4)
    assert (p.presence_penalty, p.frequency_penalty) == (1, -1.5)
    assert p.logit_bias == {5: 10, 7: -100}
    assert p.logprobs and p.top_logprobs == 3 and p.max_tokens == 9 and req.n == 2


def test_max_completion_tokens_wins():
    req = parse_chat({**CHAT, "max_tokens": 5, "max_completion_tokens": 3})
    assert req.params.max_tokens == 3 and req.max_tokens_param == "max_completion_tokens"
    err = _error(parse_chat, {**CHAT, "max_completion_tokens": 0})
    assert err.param == "max_completion_tokens"


@pytest.mark.parametrize(
    ("field", "value", "param"),
    [
        ("temperature", "hot", "temperature"),
        ("temperature", -1, "temperature"),
        ("top_p", 0, "top_p"),
        ("n", 0, "n"),
        ("n", 1000, "n"),
        ("n", 1.5, "n"),
        ("stream", "yes", "stream"),
        ("max_tokens", "10", "max_tokens"),
        ("max_tokens", 0, "max_tokens"),
        ("presence_penalty", 3, "presence_penalty"),
        ("logit_bias", {"x": 1}, "logit_bias"),
        ("logit_bias", {"1": 500}, "logit_bias"),
        ("logit_bias", [1], "logit_bias"),
        ("top_logprobs", 2, "top_logprobs"),  # needs logprobs
        ("top_logprobs", 50, "top_logprobs"),
        ("stop", ["a", 3], "stop"),
        ("stop", [""], "stop"),
        ("seed", 1.5, "seed"),
        ("model", 3, "model"),
        ("messages", "hi", "messages"),
        ("messages", [], "messages"),
        ("user", 5, "user"),
        ("stream_options", {"include_usage": True}, "stream_options"),  # without stream
    ],
)
def test_chat_bad_values_name_the_parameter(field, value, param):
    err = _error(parse_chat, {**CHAT, field: value})
    assert err.status == 400 and err.param == param, err.message


def test_missing_required_fields():
    assert _error(parse_chat, {"messages": CHAT["messages"]}).param == "model"
    assert _error(parse_chat, {"model": "m"}).param == "messages"
    assert _error(parse_chat, {**CHAT, "model": None}).param == "model"


def test_unknown_parameters_are_reported_and_refused_only_when_strict():
    body = {**CHAT, "frobnicate": 1, "id_slot": 0, "nothing": None}
    assert parse_chat(body).ignored == ["frobnicate", "id_slot"]  # null counts as absent
    err = _error(functools.partial(parse_chat, strict=True), body)
    assert err.param == "frobnicate" and "Unrecognized" in err.message
    # A known parameter we cannot honour is a 400 whether strict or not.
    for strict in (False, True):
        err = _error(functools.partial(parse_chat, strict=strict), {**CHAT, "store": True})
        assert err.param == "store" and "not supported" in err.message


def test_vendor_fields_that_map_are_honoured_not_reported():
    body = {**CHAT, "top_k": 5, "min_p": 0.1, "repetition_penalty": 1.2,
            "repetition_context_size": 7, "n_probs": 2, "cache_prompt": True,
            "chat_template_kwargs": {"enable_thinking": False}}  # fmt: skip
    req = parse_chat(body, strict=True)
    p = req.params
    assert (p.top_k, p.min_p, p.repetition_penalty, p.repetition_context_size) == (5, 0.1, 1.2, 7)
    assert p.logprobs and p.top_logprobs == 2
    assert req.template_kwargs == {"enable_thinking": False} and req.ignored == []
    # Our prefix cache is always on: turning it off is the one thing we do not do (same text).
    assert parse_chat({**CHAT, "cache_prompt": False}).ignored == ["cache_prompt"]
    assert parse_chat({**CHAT, "cache_prompt": False}, strict=True).ignored == ["cache_prompt"]


def test_anthropic_system_messages_and_extras():
    body = {"model": "claude-x", "max_tokens": 64000, "system": "top",
            "messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "late"}],
            "thinking": {"type": "adaptive"}, "output_config": {"effort": "high"},
            "context_management": {"edits": []}}  # fmt: skip
    req = parse_messages(body)
    assert [m["role"] for m in req.messages] == ["system", "user", "system"]
    assert req.messages[-1]["content"] == "late"
    assert req.template_kwargs == {"enable_thinking": True, "reasoning_effort": "high"}
    assert req.ignored == ["context_management"]
    odd = {**body, "frobnicate": 1, "output_config": {"effort": "high", "task_budget": 3}}
    assert parse_messages(odd).ignored == [
        "frobnicate",
        "context_management",
        "output_config.task_budget",
    ]
    err = _error(functools.partial(parse_messages, strict=True), odd)
    assert err.message == "frobnicate: Extra inputs are not permitted"
    counting = functools.partial(parse_messages, counting=True)
    assert counting({**body, "frobnicate": 1}).ignored == [
        "max_tokens",
        "frobnicate",
        "context_management",
    ]


def test_ollama_unknown_fields_and_options():
    body = {"model": "m", "messages": [{"role": "user", "content": "hi", "x": 1}], "y": 2,
            "options": {"num_ctx": 8192, "tyop": 1, "top_k": 3}}  # fmt: skip
    req = parse_ollama_chat(body, 512)
    assert req.ignored == ["y", "messages.0.x", "options.num_ctx", "options.tyop"]
    assert req.params.top_k == 3
    err = _error(functools.partial(parse_ollama_chat, strict=True), body, 512)
    assert err.message == 'json: unknown field "y"'
    known = {"model": "m", "options": {"num_ctx": 8192}}
    assert parse_ollama_chat(known, 512, strict=True).ignored == ["options.num_ctx"]


def test_tools_tool_choice_and_response_format_are_parsed():
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    req = parse_chat({**CHAT, "tools": [tool], "tool_choice": "required"})
    assert req.tools == [tool] and req.tool_choice.mode == "required"
    named = {"type": "function", "function": {"name": "f"}}
    req = parse_chat({**CHAT, "tools": [tool], "tool_choice": named, "parallel_tool_calls": True})
    assert (req.tool_choice.mode, req.tool_choice.name) == ("named", "f")
    assert parse_chat({**CHAT, "tools": [tool]}).tool_choice.mode == "auto"
    assert parse_chat(CHAT).tool_choice.mode == "none"
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    req = parse_chat({**CHAT, "response_format": fmt})
    assert req.output.kind == "json_schema" and req.output.schema == {"type": "object"}
    assert parse_chat({**CHAT, "response_format": {"type": "json_object"}}).output.kind == (
        "json_object"
    )
    for patch, param in [
        ({"tool_choice": "required"}, "tool_choice"),  # no tools
        ({"tools": [tool], "tool_choice": {"type": "function", "function": {"name": "g"}}},
         "tool_choice"),
        ({"tools": [tool], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [tool, tool]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "has space"}}]},
         "tools[0].function.name"),
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": 3}}},
         "response_format.json_schema.schema"),
        ({"grammar": "", }, "grammar"),
    ]:  # fmt: skip
        assert _error(parse_chat, {**CHAT, **patch}).param == param


def test_tool_messages_reach_the_template_shape():
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
    req = parse_chat(
        {**CHAT, "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": "42"},
        ]}
    )  # fmt: skip
    assert req.messages[1]["tool_calls"] == [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}}
    ]
    assert req.messages[2] == {"role": "tool", "content": "42", "tool_call_id": "c1"}
    bad = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "[1]"}}
    err = _error(
        parse_chat,
        {**CHAT, "messages": [{"role": "assistant", "content": None, "tool_calls": [bad]}]},
    )
    assert err.param == "messages[0].tool_calls[0].function.arguments"


def test_noop_values_are_accepted():
    parse_chat(
        {**CHAT, "tools": [], "tool_choice": "none", "response_format": {"type": "text"},
         "parallel_tool_calls": False, "store": False, "metadata": {"a": "b"}}
    )  # fmt: skip


def test_messages_content_parts_and_roles():
    req = parse_chat(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "name": "bob"},
                {"role": "assistant", "content": None},
            ],
        }
    )  # fmt: skip
    assert req.messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "a\nb", "name": "bob"},
        {"role": "assistant", "content": ""},
    ]


@pytest.mark.parametrize(
    ("message", "param"),
    [
        ({"role": "user"}, "messages[0].content"),
        ({"content": "x"}, "messages[0].role"),
        ({"role": "wizard", "content": "x"}, "messages[0].role"),
        ({"role": "tool", "content": "x"}, "messages[0].tool_call_id"),
        ({"role": "user", "content": 5}, "messages[0].content"),
        ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
         "messages[0].content[0].type"),
        ({"role": "user", "content": [{"text": "x"}]}, "messages[0].content[0].type"),
        ({"role": "user", "content": [{"type": "text"}]}, "messages[0].content[0].text"),
        ({"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
         "messages[0].tool_calls[0].function"),
        ("hello", "messages[0]"),
    ],
)  # fmt: skip
def test_bad_messages_name_the_field(message, param):
    err = _error(parse_chat, {"model": "m", "messages": [message]})
    assert err.status == 400 and err.param == param, err.message


def test_stream_options():
    req = parse_chat({**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    assert req.stream and req.include_usage
    body = {**CHAT, "stream": True, "stream_options": {"x": 1}}
    assert parse_chat(body).ignored == ["stream_options.x"]
    assert _error(functools.partial(parse_chat, strict=True), body).status == 400


# ---------------------------------------------------------------- completions


def test_completion_prompt_forms():
    base = {"model": "m"}
    assert parse_completion({**base, "prompt": "a"}).prompts == ["a"]
    assert parse_completion({**base, "prompt": ["a", "b"]}).prompts == ["a", "b"]
    assert parse_completion({**base, "prompt": [1, 2]}).prompts == [[1, 2]]
    assert parse_completion({**base, "prompt": [[1], [2, 3]]}).prompts == [[1], [2, 3]]
    for bad in ([], ["a", 1], [[1], []], [[1, "a"]], 5, [True]):
        assert _error(parse_completion, {**base, "prompt": bad}).param.startswith("prompt")
    assert _error(parse_completion, base).param == "prompt"


def test_completion_fields():
    req = parse_completion({"model": "m", "prompt": "a", "logprobs": 2, "echo": True, "n": 3})
    # Not sent: the budget rule applies OpenAI's default for this endpoint (16), not a client ask.
    assert req.params.max_tokens is None and req.default_max_tokens == 16
    assert req.params.logprobs and req.params.top_logprobs == 2 and req.logprobs == 2
    assert req.echo and req.n == 3
    assert parse_completion({"model": "m", "prompt": "a", "logprobs": 0}).params.logprobs
    assert parse_completion({"model": "m", "prompt": "a"}).logprobs is None
    for field, value in [("logprobs", 6), ("logprobs", True), ("best_of", 3), ("echo", 1),
                         ("suffix", 3)]:  # fmt: skip
        assert _error(parse_completion, {"model": "m", "prompt": "a", field: value}).param == field
    # Chat's fields mean nothing here: reported, or refused under --strict.
    body = {"model": "m", "prompt": "a", "top_logprobs": 2, "messages": []}
    assert parse_completion(body).ignored == ["top_logprobs", "messages"]
    strict = functools.partial(parse_completion, strict=True)
    assert _error(strict, body).param == "top_logprobs"
    many = {"model": "m", "prompt": ["a"] * 65, "n": 2}
    assert _error(parse_completion, many).param == "n"


# ---------------------------------------------------------------- fuzz

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
_fields = [
    "model", "messages", "prompt", "temperature", "top_p", "n", "stream", "stop", "max_tokens",
    "logprobs", "top_logprobs", "logit_bias", "seed", "echo", "stream_options", "suffix", "tools",
    "presence_penalty", "max_completion_tokens", "best_of", "top_k", "min_p",
]  # fmt: skip
_bodies = st.dictionaries(st.sampled_from(_fields), _json, max_size=8).map(
    lambda d: {"model": "m", "messages": [{"role": "user", "content": "x"}], "prompt": "p", **d}
)


@settings(max_examples=400, deadline=None)
@given(body=_bodies)
def test_fuzzed_bodies_parse_or_raise_api_errors(body):
    for parse in (parse_chat, parse_completion):
        try:
            parse({k: v for k, v in body.items() if parse is parse_chat or k != "messages"})
        except APIError as e:
            assert e.status == 400 and e.message


# ---------------------------------------------------------------- errors, SSE, metrics, tokens


def test_typed_errors_map_by_class():
    cases = [
        (InvalidRequestError("bad", param="x"), 400, "x", None),
        (ContextLengthExceededError(10, 5), 400, "messages", "context_length_exceeded"),
        (EngineOverloadedError("busy", retry_after=2.5), 429, None, "rate_limit_exceeded"),
        (ModelNotFoundError("nope"), 404, "model", "model_not_found"),
        (InsufficientMemoryError("full"), 503, None, "insufficient_memory"),
        (UnsupportedModelError("odd"), 500, None, "internal_error"),
    ]
    for exc, status, param, code in cases:
        err = from_mlxrun(exc)
        assert (err.status, err.param, err.code) == (status, param, code)
        assert set(err.body()["error"]) == {"message", "type", "param", "code"}
    assert from_mlxrun(EngineOverloadedError("busy", retry_after=2.5)).headers["Retry-After"] == "3"


def test_sse_framing():
    assert event({"a": "é"}) == 'data: {"a":"é"}\n\n'.encode()
    assert DONE == b"data: [DONE]\n\n"


def test_histogram_and_metrics_text():
    h = Histogram("x_seconds", "X.", (0.1, 1))
    for v in (0.05, 0.5, 5, float("nan")):
        h.observe(v)
    text = "\n".join(h.render())
    assert 'mlxrun_x_seconds_bucket{le="0.1"} 1' in text
    assert 'mlxrun_x_seconds_bucket{le="1"} 2' in text
    assert 'mlxrun_x_seconds_bucket{le="+Inf"} 3' in text and "mlxrun_x_seconds_count 3" in text
    m = Metrics()
    m.count_request("/v1/completions", 200)
    out = m.render({"queue_depth": ("Waiting.", 3)})
    assert 'mlxrun_requests_total{endpoint="/v1/completions",status="200"} 1' in out
    assert "mlxrun_queue_depth 3" in out and out.endswith("\n")


def test_byte_level_alphabet_is_a_bijection():
    table = _byte_decoder()
    assert sorted(table.values()) == list(range(256))
    assert table["Ġ"] == 0x20 and table["A"] == 0x41
    assert json.dumps(sorted(table)) == json.dumps(sorted(set(table)))
