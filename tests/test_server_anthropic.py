"""Anthropic's Messages API as its clients use it: the official `anthropic` client against a real
server (uvicorn on loopback, the real engine, a tiny random-weight model with a ChatML + tools
template). Random weights never call a tool by themselves, so calls are forced with tool_choice
"any" or "tool" (the grammar makes them valid); text is gibberish, so decoding is greedy."""

from __future__ import annotations

import json
import time

import anthropic
import httpx
import jsonschema
import pytest

from mlxrun.server.routes import anthropic as anthropic_routes
from serverutil import ADD, MODEL_ID, WEATHER, make_app, serve_in_thread

pytestmark = pytest.mark.server

GREEDY = {"temperature": 0}  # not a keyword of this client version: sent through extra_body
USER = [{"role": "user", "content": "Write a function that adds two numbers."}]
TOOLS = [
    {"name": "get_weather", "description": "Weather in a city.", "input_schema": WEATHER},
    {"name": "add", "input_schema": ADD, "cache_control": {"type": "ephemeral"}},
]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
CONTEXT = 1024  # room for the tools' part of the prompt and a forced call


@pytest.fixture(scope="module")
def server(tiny_llama):
    app = make_app(tiny_llama, context=CONTEXT, aliases=("claude-local",))
    with serve_in_thread(app) as url:
        yield app, url


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=server[1], api_key="unused", max_retries=0)


def _create(client, **kw):
    args = {"model": MODEL_ID, "max_tokens": 8, "messages": USER, "extra_body": GREEDY, **kw}
    return client.messages.create(**args)


def _stream(client, **kw):
    args = {"model": MODEL_ID, "max_tokens": 8, "messages": USER, "extra_body": GREEDY, **kw}
    with client.messages.stream(**args) as stream:
        events = list(stream)
        return events, stream.get_final_message()


def _text(message) -> str:
    return "".join(b.text for b in message.content if b.type == "text")


def _blocks(message) -> list[dict]:
    """Content as plain dicts (the stream helper's blocks carry a parsed_output of their own)."""
    return [b.model_dump(exclude={"parsed_output"}) for b in message.content]


def _total(usage) -> int:
    return usage.input_tokens + usage.cache_read_input_tokens + usage.cache_creation_input_tokens


# ---------------------------------------------------------------- text


def test_message_shape_and_usage(client):
    m = _create(client)
    assert m.type == "message" and m.role == "assistant" and m.id.startswith("msg_")
    assert m.model == MODEL_ID and m.stop_reason == "max_tokens" and m.stop_sequence is None
    assert [b.type for b in m.content] == ["text"]
    assert m.usage.output_tokens == 8 and m.usage.cache_creation_input_tokens == 0
    assert _total(m.usage) > 10
    again = _create(client, model="claude-local")  # an alias reaches the same model
    assert _text(again) == _text(m) and again.model == "claude-local"
    assert again.usage.cache_read_input_tokens > 0  # the prefix cache kept the first prompt


def test_streamed_text_equals_the_message(client):
    events, final = _stream(client, max_tokens=12)
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert kinds[-2] == "message_delta"
    start = events[0].message
    assert start.content == [] and start.stop_reason is None and start.usage.input_tokens > 0
    deltas = "".join(
        e.delta.text
        for e in events
        if e.type == "content_block_delta" and e.delta.type == "text_delta"
    )
    assert deltas and _text(final) == deltas
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 12
    plain = _create(client, max_tokens=12)
    assert _blocks(plain) == _blocks(final) and plain.stop_reason == final.stop_reason


def test_raw_stream_framing_and_pings(server, client, monkeypatch):
    monkeypatch.setattr(anthropic_routes, "PING_S", 0.005)  # pings between tokens
    body = {"model": MODEL_ID, "max_tokens": 6, "messages": USER, "stream": True, **GREEDY}
    with httpx.stream("POST", server[1] + "/v1/messages", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    frames = [f for f in raw.split("\n\n") if f]
    kinds = []
    for frame in frames:
        event, data = frame.split("\n")
        assert event.startswith("event: ") and data.startswith("data: ")
        assert json.loads(data[6:])["type"] == event[7:]
        kinds.append(event[7:])
    # Pings may come before message_start: it waits for the prefix-cache lookup.
    real = [k for k in kinds if k != "ping"]
    assert real[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert "ping" in kinds
    _, final = _stream(client, max_tokens=6)  # the client skips the pings
    assert _blocks(final) == _blocks(_create(client, max_tokens=6))


def test_system_prompt_reaches_the_prompt(client):
    bare = client.messages.count_tokens(model=MODEL_ID, messages=USER).input_tokens
    system = "You are terse. " * 10
    as_text = client.messages.count_tokens(model=MODEL_ID, messages=USER, system=system)
    blocks = [{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}]
    as_blocks = client.messages.count_tokens(model=MODEL_ID, messages=USER, system=blocks)
    assert as_text.input_tokens == as_blocks.input_tokens > bare + 20
    m = _create(client, system=blocks, max_tokens=2)
    assert _total(m.usage) == as_blocks.input_tokens


def test_stop_sequences_end_the_text(client):
    first = _text(_create(client, max_tokens=16))
    words = first.split()
    assert len(words) >= 3, first
    stop = words[2]
    m = _create(client, max_tokens=16, stop_sequences=["never-there", stop])
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == stop
    assert _text(m) == first[: first.index(stop)]
    events, final = _stream(client, max_tokens=16, stop_sequences=[stop])
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == stop
    assert _text(final) == _text(m)


def test_prefill_continues_the_assistant_turn(client):
    prefill = [*USER, {"role": "assistant", "content": "def add(a, b):"}]
    plain = client.messages.count_tokens(model=MODEL_ID, messages=USER).input_tokens
    count = client.messages.count_tokens(model=MODEL_ID, messages=prefill).input_tokens
    assert count > plain
    m = _create(client, messages=prefill, max_tokens=3)
    assert _total(m.usage) == count and m.usage.output_tokens == 3


def test_count_tokens_matches_the_prompt_used(client):
    long = [{"role": "user", "content": "count me " * 30}]
    counted = client.messages.count_tokens(model=MODEL_ID, messages=long, tools=TOOLS)
    m = _create(client, messages=long, tools=TOOLS, max_tokens=1)
    assert _total(m.usage) == counted.input_tokens
    no_tools = client.messages.count_tokens(model=MODEL_ID, messages=long)
    assert counted.input_tokens > no_tools.input_tokens  # the tools are in the prompt
    none = client.messages.count_tokens(
        model=MODEL_ID, messages=long, tools=TOOLS, tool_choice={"type": "none"}
    )
    assert none.input_tokens == no_tools.input_tokens  # tool_choice none leaves them out


def test_max_tokens_zero_warms_the_cache(client):
    warm = [{"role": "user", "content": "warm me up " * 20}]
    m = _create(client, messages=warm, max_tokens=0)
    assert m.content == [] and m.stop_reason == "max_tokens" and m.usage.output_tokens == 0
    hit = _create(client, messages=warm, max_tokens=2)
    assert hit.usage.cache_read_input_tokens > 20


def test_cache_control_counts_the_marked_prefix(client):
    text = "a cached document " * 30
    marked = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": text, "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": "What is in it?"},
            ],
        }
    ]
    first = _create(client, messages=marked, max_tokens=1)
    assert first.usage.cache_creation_input_tokens > 30  # the marked document
    assert first.usage.input_tokens > 0  # the question after the mark
    again = _create(client, messages=marked, max_tokens=1)
    assert again.usage.cache_creation_input_tokens == 0
    assert again.usage.cache_read_input_tokens >= first.usage.cache_creation_input_tokens
    assert _total(again.usage) == _total(first.usage)


def _stream_usage(url: str, body: dict) -> tuple[dict, dict]:
    """The usage of message_start and of message_delta in a raw stream."""
    with httpx.stream("POST", url + "/v1/messages", json={**body, "stream": True}, timeout=60) as r:
        frames = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    start = next(f for f in frames if f["type"] == "message_start")["message"]["usage"]
    end = next(f for f in frames if f["type"] == "message_delta")["usage"]
    return start, end


def test_streamed_usage_agrees_with_itself_and_anthropics_accounting(server, client):
    system = [{"type": "text", "text": "a stable system prompt " * 10,
               "cache_control": {"type": "ephemeral"}}]  # fmt: skip
    question = [{"role": "user", "content": "and a question after the mark, asked twice"}]
    body = {"model": MODEL_ID, "max_tokens": 3, "system": system, "messages": question, **GREEDY}
    prompt = client.messages.count_tokens(model=MODEL_ID, system=system, messages=question)
    runs = [_stream_usage(server[1], body) for _ in range(2)]
    keys = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
    for start, end in runs:
        assert {k: start[k] for k in keys} == {k: end[k] for k in keys}  # one set of figures
        assert sum(end[k] for k in keys) == prompt.input_tokens
    (_, first), (_, again) = runs
    # (other tests' prompts may share the template's first tokens: part of the mark is read)
    marked = first["cache_creation_input_tokens"] + first["cache_read_input_tokens"]
    assert first["cache_creation_input_tokens"] > 30
    # The repeat reads the marked prefix; what follows the mark stays input, cached or not.
    assert again["cache_read_input_tokens"] == marked
    assert again["cache_creation_input_tokens"] == 0
    assert again["input_tokens"] == first["input_tokens"] == prompt.input_tokens - marked


def test_structured_output(client):
    fmt = {"type": "json_schema", "schema": WEATHER}
    m = _create(client, max_tokens=120, output_config={"format": fmt})
    assert m.stop_reason == "end_turn"
    jsonschema.validate(json.loads(_text(m)), WEATHER)


def test_thinking_blocks(thinking_model):
    """A template that opens <think> (as Qwen3 does): random weights never close it, so the
    whole reply is thinking."""
    with serve_in_thread(make_app(thinking_model)) as url:
        client = anthropic.Anthropic(base_url=url, api_key="x", max_retries=0)
        thinking = {"type": "enabled", "budget_tokens": 2048}
        m = _create(client, thinking=thinking)
        (block,) = m.content
        assert block.type == "thinking" and block.thinking and block.signature == ""
        events, final = _stream(client, thinking=thinking)
        deltas = [e.delta for e in events if e.type == "content_block_delta"]
        assert {d.type for d in deltas} == {"thinking_delta"}
        assert "".join(d.thinking for d in deltas) == block.thinking
        assert _blocks(final) == _blocks(m)
        hidden = _create(client, thinking={**thinking, "display": "omitted"})
        assert hidden.content == [] and hidden.usage.output_tokens == 8


def test_cache_control_pins_the_prefix(server, client):
    engine = server[0].state.server.engine
    before = engine.stats()["pinned_prefixes"]
    system = [{"type": "text", "text": "pin me " * 30, "cache_control": {"type": "ephemeral"}}]
    _create(client, system=system, max_tokens=1)
    assert engine.stats()["pinned_prefixes"] == before + 1


# ---------------------------------------------------------------- tools


def _tool_uses(message):
    return [b for b in message.content if b.type == "tool_use"]


@pytest.mark.parametrize(
    "choice",
    [
        {"type": "any"},
        {"type": "tool", "name": "add"},
        {"type": "any", "disable_parallel_tool_use": True},
    ],
)
def test_forced_tool_use(client, choice):
    m = _create(client, tools=TOOLS, tool_choice=choice, max_tokens=120)
    assert m.stop_reason == "tool_use"
    uses = _tool_uses(m)
    assert uses and all(u.id.startswith("toolu_") for u in uses)
    for use in uses:
        jsonschema.validate(use.input, SCHEMAS[use.name])
    if choice["type"] == "tool":
        assert {u.name for u in uses} == {"add"}
    if choice.get("disable_parallel_tool_use") or choice["type"] == "tool":
        assert len(uses) == 1


def test_streamed_tool_use_equals_the_message(client):
    kw = {"tools": TOOLS, "tool_choice": {"type": "tool", "name": "get_weather"}, "max_tokens": 120}
    plain = _create(client, **kw)
    events, final = _stream(client, **kw)
    assert final.stop_reason == plain.stop_reason == "tool_use"
    starts = [e for e in events if e.type == "content_block_start"]
    assert [s.content_block.type for s in starts] == [b.type for b in plain.content]
    (use,) = _tool_uses(final)
    (block,) = [s for s in starts if s.content_block.type == "tool_use"]
    assert block.content_block.input == {} and block.content_block.name == "get_weather"
    fragments = [
        e.delta.partial_json
        for e in events
        if e.type == "content_block_delta" and e.index == block.index
    ]
    assert json.loads("".join(fragments)) == use.input == _tool_uses(plain)[0].input
    assert [(u.name, u.input) for u in _tool_uses(final)] == [
        (u.name, u.input) for u in _tool_uses(plain)
    ]


def test_tool_result_round_trip(client):
    call = _create(client, tools=TOOLS, tool_choice={"type": "tool", "name": "add"}, max_tokens=120)
    (use,) = _tool_uses(call)
    history = [
        *USER,
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in call.content]},
    ]

    def result(text, **extra):
        block = {"type": "tool_result", "tool_use_id": use.id, "content": text, **extra}
        return [*history, {"role": "user", "content": [block]}]

    short = client.messages.count_tokens(model=MODEL_ID, messages=result("5"), tools=TOOLS)
    longer = client.messages.count_tokens(
        model=MODEL_ID,
        messages=result([{"type": "text", "text": "the sum is five " * 10}]),
        tools=TOOLS,
    )
    failed = client.messages.count_tokens(
        model=MODEL_ID, messages=result("5", is_error=True), tools=TOOLS
    )
    assert (
        longer.input_tokens > short.input_tokens + 20 and failed.input_tokens > short.input_tokens
    )
    thinking = {"type": "thinking", "thinking": "I should add.", "signature": "sig"}
    history[1]["content"].insert(0, thinking)
    history[1]["content"].insert(0, {"type": "redacted_thinking", "data": "opaque"})
    reply = _create(client, messages=result("5"), tools=TOOLS, max_tokens=4)
    assert reply.stop_reason in ("max_tokens", "end_turn")
    assert _total(reply.usage) >= short.input_tokens


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kw",
    [
        {"tools": TOOLS, "tool_choice": {"type": "tool", "name": "nope"}},
        {"tools": [{"type": "web_search_20250305", "name": "web_search"}]},
        {"tool_choice": {"type": "any"}},  # no tools
        {"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
        {"messages": [{"role": "tool", "content": "hi"}]},
        {"extra_body": {"temperature": 1.5}},
        {"thinking": {"type": "enabled", "budget_tokens": 10}},
        {"tools": TOOLS, "tool_choice": {"type": "any"}, "thinking": {"type": "adaptive"}},
    ],
)
def test_bad_requests(client, kw):
    with pytest.raises(anthropic.BadRequestError) as info:
        _create(client, **kw)
    assert info.value.body["type"] == "error"
    assert info.value.body["error"]["type"] == "invalid_request_error"
    assert info.value.body["error"]["message"]


def test_missing_max_tokens_and_bad_json(server):
    url = server[1] + "/v1/messages"
    r = httpx.post(url, json={"model": MODEL_ID, "messages": USER})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(url, content=b"{nope")
    assert r.status_code == 400 and r.json()["type"] == "error"


def test_unknown_model(client):
    with pytest.raises(anthropic.NotFoundError) as info:
        _create(client, model="claude-opus-4-1")
    assert info.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.NotFoundError):
        client.messages.count_tokens(model="claude-opus-4-1", messages=USER)


def test_prompt_too_long_reads_like_anthropic(client):
    huge = [{"role": "user", "content": "many words here " * CONTEXT}]
    with pytest.raises(anthropic.BadRequestError) as info:
        _create(client, messages=huge)
    assert info.value.body["error"]["message"].startswith("prompt is too long: ")


def test_max_tokens_past_the_context_is_cut(client):
    def words(k):
        return [{"role": "user", "content": "x " * k}]

    def count(k):
        return client.messages.count_tokens(model=MODEL_ID, messages=words(k)).input_tokens

    per = count(201) - count(200)
    k = 200 + (CONTEXT - 6 - count(200)) // per  # a prompt that leaves a few tokens
    m = _create(client, max_tokens=20_000, messages=words(k))
    assert m.stop_reason == "model_context_window_exceeded"
    assert _total(m.usage) + m.usage.output_tokens == CONTEXT


def test_overload_is_529_and_a_closed_stream_frees_its_slot(tiny_llama):
    app = make_app(tiny_llama, max_running=1, max_waiting=0)
    with serve_in_thread(app) as url:
        client = anthropic.Anthropic(base_url=url, api_key="x", max_retries=0)
        with client.messages.stream(model=MODEL_ID, max_tokens=400, messages=USER) as held:
            next(iter(held))  # message_start: the only slot is taken
            with pytest.raises(anthropic.OverloadedError) as info:
                _create(client, max_tokens=1)
            assert info.value.body["error"]["type"] == "overloaded_error"
            assert info.value.response.headers["retry-after"]
        engine = app.state.server.engine
        deadline = time.monotonic() + 10  # leaving the stream aborts its request
        while not engine.stats()["aborted"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.stats()["aborted"] == 1 and engine.stats()["running"] == 0
        assert _create(client, max_tokens=2).usage.output_tokens == 2


def test_api_key(tiny_llama):
    with serve_in_thread(make_app(tiny_llama, api_key="secret")) as url:
        with pytest.raises(anthropic.AuthenticationError):
            _create(anthropic.Anthropic(base_url=url, api_key="wrong", max_retries=0))
        ok = anthropic.Anthropic(base_url=url, api_key="secret", max_retries=0)
        assert _create(ok, max_tokens=1).usage.output_tokens == 1
