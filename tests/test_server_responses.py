"""OpenAI's Responses API as its clients use it: the official `openai` client (responses.create,
responses.stream, retrieve / delete / input_items / cancel) against a real server (uvicorn on
loopback, the real engine, the tiny random-weight model with a ChatML + tools template). Random
weights never call a tool by themselves, so calls are forced with tool_choice; decoding is greedy.
"""

from __future__ import annotations

import json
import subprocess
import time

import httpx
import jsonschema
import openai
import pydantic
import pytest
from openai.types.responses import Response, ResponseStreamEvent

from mlxrun.server.routes import responses as responses_routes
from serverutil import ADD, CLI, MODEL_ID, WEATHER, make_app, serve_in_thread, start_cli

pytestmark = pytest.mark.server

CONTEXT = 2048  # room for five turns with tools
GREEDY = {"temperature": 0}
TOOLS = [
    {"type": "function", "name": "get_weather", "description": "Weather.", "parameters": WEATHER},
    {"type": "function", "name": "add", "parameters": ADD},
]
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def server(tiny_llama):
    app = make_app(tiny_llama, context=CONTEXT)
    with serve_in_thread(app) as url:
        yield app, url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key="unused", max_retries=0)


def _create(client, **kw):
    args = {"model": MODEL_ID, "input": "Write a function.", "max_output_tokens": 8, **GREEDY}
    return client.responses.create(**{**args, **kw})


# ---------------------------------------------------------------- text


def test_plain_response_shape_and_retrieve(client):
    r = _create(client, instructions="Be brief.", metadata={"k": "v"})
    assert r.object == "response" and r.id.startswith("resp_") and r.model == MODEL_ID
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    [item] = r.output
    assert item.type == "message" and item.role == "assistant" and item.status == "incomplete"
    assert [p.type for p in item.content] == ["output_text"] and r.output_text
    assert r.usage.output_tokens == 8 and r.usage.input_tokens > 5
    assert r.usage.total_tokens == r.usage.input_tokens + 8
    assert r.instructions == "Be brief." and r.metadata == {"k": "v"} and r.store is True
    got = client.responses.retrieve(r.id)
    assert got.model_dump() == r.model_dump()
    again = _create(client, instructions="Be brief.")  # same prompt: the prefix cache serves it
    assert again.output_text == r.output_text
    assert again.usage.input_tokens_details.cached_tokens > 0


def test_instructions_and_input_items_reach_the_prompt(client):
    bare = _create(client, max_output_tokens=1).usage.input_tokens
    system = _create(client, instructions="You are terse. " * 5, max_output_tokens=1)
    assert system.usage.input_tokens > bare + 10
    items = [
        {"type": "message", "role": "developer", "content": "Rules."},
        {"role": "user", "content": [{"type": "input_text", "text": "Hello"}]},
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Hi"}],
        },
        {"role": "user", "content": "Write a function."},
    ]
    longer = _create(client, input=items, max_output_tokens=1)
    assert longer.usage.input_tokens > bare + 6
    # Consecutive system / developer turns are one system turn, as instructions + input are.
    two = [{"role": "developer", "content": "A."}, {"role": "system", "content": "B."},
           {"role": "user", "content": "Write a function."}]  # fmt: skip
    joined = _create(client, instructions="A.", input=two[1:], max_output_tokens=1)
    merged = _create(client, input=two, max_output_tokens=1)
    assert merged.usage.input_tokens == joined.usage.input_tokens
    assert merged.usage.input_tokens_details.cached_tokens > 0  # the very same prompt


def test_streamed_events_build_the_same_response(client):
    with client.responses.stream(
        model=MODEL_ID, input="Write a function.", max_output_tokens=10, **GREEDY
    ) as stream:
        events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    # Cut off by max_output_tokens: response.incomplete ends it (get_final_response() reads
    # only response.completed, as against OpenAI).
    assert kinds[-1] == "response.incomplete"
    final = events[-1].response
    assert [e.sequence_number for e in events] == list(range(len(events)))
    for kind in ("response.output_item.added", "response.content_part.added",
                 "response.output_text.done", "response.content_part.done",
                 "response.output_item.done"):  # fmt: skip
        assert kinds.count(kind) == 1, kind
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas and final.output_text == deltas
    assert final.usage.output_tokens == 10
    plain = _create(client, max_output_tokens=10)
    assert plain.output_text == final.output_text and plain.status == final.status
    assert client.responses.retrieve(final.id).output_text == deltas  # streams are stored too


STRICT_EVENT = pydantic.TypeAdapter(ResponseStreamEvent)


def _raw_events(url: str, **kw) -> list[dict]:
    """A raw stream, each frame checked: `event:` names its data's type, and the data validates
    strictly (every required field) against the SDK's event types."""
    body = {
        "model": MODEL_ID,
        "input": "Hi",
        "max_output_tokens": 3,
        "stream": True,
        **GREEDY,
        **kw,
    }
    with httpx.stream("POST", url + "/v1/responses", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = []
    for frame in [f for f in raw.split("\n\n") if f]:
        event, data = frame.split("\n")
        events.append(json.loads(data.removeprefix("data: ")))
        assert events[-1]["type"] == event.removeprefix("event: ")
        STRICT_EVENT.validate_python(events[-1])
    return events


def test_raw_streams_match_the_sdk_types_strictly(server):
    url = server[1]
    text = _raw_events(url)
    calls = _raw_events(url, tools=TOOLS, tool_choice="required", max_output_tokens=60)
    assert "response.output_text.delta" in {e["type"] for e in text}
    assert "response.function_call_arguments.delta" in {e["type"] for e in calls}
    for events in (text, calls):
        final = events[-1]["response"]
        Response.model_validate(final)
        got = httpx.get(f"{url}/v1/responses/{final['id']}", timeout=60).json()
        assert Response.model_validate(got) == Response.model_validate(final)


# ---------------------------------------------------------------- tools and formats


def test_forced_tool_call_then_its_output(client):
    r = _create(client, tools=TOOLS, tool_choice={"type": "function", "name": "get_weather"},
                max_output_tokens=60)  # fmt: skip
    assert r.status == "completed"
    [call] = r.output
    assert call.type == "function_call" and call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), WEATHER)
    follow = _create(
        client,
        previous_response_id=r.id,
        tools=TOOLS,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
    )
    assert follow.usage.input_tokens > r.usage.input_tokens
    assert follow.usage.input_tokens_details.cached_tokens >= r.usage.input_tokens


def test_required_tool_choice_streamed(client):
    with client.responses.stream(model=MODEL_ID, input="Add 2 and 3.", tools=TOOLS,
                                 tool_choice="required", parallel_tool_calls=False,
                                 max_output_tokens=60, **GREEDY) as stream:  # fmt: skip
        events = list(stream)
        final = stream.get_final_response()
    calls = [o for o in final.output if o.type == "function_call"]
    assert len(calls) == 1 and calls[0].name in ("get_weather", "add")
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert args == calls[0].arguments == done[0].arguments
    jsonschema.validate(json.loads(args), WEATHER if calls[0].name == "get_weather" else ADD)


def test_namespace_tools_are_function_tools_that_name_it(client):
    """Codex sends its sub-agent tools as a `namespace` group; a call names the namespace."""
    group = {
        "type": "namespace",
        "name": "agents",
        "description": "Sub-agents.",
        "tools": [{"type": "function", "name": "add", "strict": False, "parameters": ADD}],
    }
    r = _create(client, tools=[TOOLS[0], group], tool_choice={"type": "function", "name": "add"},
                max_output_tokens=60)  # fmt: skip
    [call] = r.output
    assert call.name == "add" and call.namespace == "agents"
    jsonschema.validate(json.loads(call.arguments), ADD)
    plain = _create(client, tools=TOOLS, tool_choice={"type": "function", "name": "add"},
                    max_output_tokens=60)  # fmt: skip
    assert plain.output[0].namespace is None


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_text_format(client, stream):
    fmt = {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}
    kw = {"model": MODEL_ID, "input": "A person.", "text": {"format": fmt},
          "max_output_tokens": 60, **GREEDY}  # fmt: skip
    if stream:
        with client.responses.stream(**kw) as s:
            list(s)
            r = s.get_final_response()
    else:
        r = client.responses.create(**kw)
    assert r.status == "completed" and r.text.format.type == "json_schema"
    jsonschema.validate(json.loads(r.output_text), PERSON)


def test_json_object_text_format_is_the_chat_grammar(client):
    r = _create(client, text={"format": {"type": "json_object"}}, max_output_tokens=40)
    chat = client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "Write a function."}],
        response_format={"type": "json_object"}, max_tokens=40, **GREEDY)  # fmt: skip
    assert r.output_text.startswith("{") and r.output_text == chat.choices[0].message.content
    if r.status == "completed":
        assert isinstance(json.loads(r.output_text), dict)
    with pytest.raises(openai.BadRequestError) as e:  # a forced call leaves no room for JSON
        _create(
            client, tools=TOOLS, tool_choice="required", text={"format": {"type": "json_object"}}
        )
    assert e.value.body["param"] == "text.format"


# ---------------------------------------------------------------- state


def test_chain_of_five_turns_reuses_the_prefix(client):
    r = _create(client, instructions="You write Python.", input="Turn 1.")
    cached, prompts = [], [r.usage.input_tokens]
    for turn in range(2, 6):
        r = _create(client, instructions="You write Python.", previous_response_id=r.id,
                    input=f"Turn {turn}.")  # fmt: skip
        assert r.previous_response_id is not None
        cached.append(r.usage.input_tokens_details.cached_tokens)
        prompts.append(r.usage.input_tokens)
        # The earlier prompt at least came from the cache: only the new turn was prefilled.
        assert cached[-1] >= prompts[-2]
    assert cached == sorted(cached) and len(set(cached)) == len(cached)  # growing each turn
    items = client.responses.input_items.list(r.id, order="asc", limit=100).data
    texts = [i.content[0].text for i in items if i.type == "message" and i.role == "user"]
    assert texts == [f"Turn {t}." for t in range(1, 6)]
    assert sum(i.role == "assistant" for i in items if i.type == "message") == 4


def _words(seed: int, n: int = 60) -> str:
    return " ".join(f"word{(seed * 7919 + i * 104729) % 9973}" for i in range(n))


def test_a_stored_response_stays_cached_under_pressure(tiny_llama):
    """The prompt of a stored response is pinned: unrelated traffic that pushes everything else
    out of a small prefix cache leaves it, so the next turn still reuses it."""
    app = make_app(tiny_llama, context=1024)
    with serve_in_thread(app) as url:  # how much cache one such request takes
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        _create(client, input=_words(0), max_output_tokens=2, store=False)
        one = app.state.server.engine.stats()["cache_memory_bytes"]
    small = make_app(tiny_llama, context=1024, cache_memory_bytes=int(one * 2.5))
    with serve_in_thread(small) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        kept = _create(client, input=_words(1), max_output_tokens=2)
        lost = _create(client, input=_words(2), max_output_tokens=2, store=False)
        for i in range(4):  # newer prompts push the older ones out of the LRU order
            _create(client, input=_words(10 + i), max_output_tokens=2, store=False)
        follow = _create(client, previous_response_id=kept.id, input="Next.", max_output_tokens=2)
        history = [
            {"role": "user", "content": _words(2)},
            *[o.model_dump() for o in lost.output],
            {"role": "user", "content": "Next."},
        ]
        resent = _create(client, input=history, max_output_tokens=2, store=False)
    assert follow.usage.input_tokens_details.cached_tokens >= kept.usage.input_tokens
    assert resent.usage.input_tokens_details.cached_tokens < lost.usage.input_tokens // 2


def test_input_items_pages(client):
    items = [{"role": "user", "content": f"m{i}"} for i in range(5)]
    r = _create(client, input=items, max_output_tokens=1)
    page = client.responses.input_items.list(r.id, limit=2)  # newest first by default
    assert [i.content[0].text for i in page.data] == ["m4", "m3"] and page.has_more
    rest = client.responses.input_items.list(r.id, limit=10, after=page.data[-1].id)
    assert [i.content[0].text for i in rest.data] == ["m2", "m1", "m0"]
    assert not rest.has_more


def test_delete_and_store_false(client):
    r = _create(client, max_output_tokens=1)
    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(r.id)
    unstored = _create(client, max_output_tokens=1, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_background_response_and_cancel(client, server):
    r = _create(client, background=True, max_output_tokens=6)
    assert r.status in ("queued", "in_progress") and r.background
    deadline = time.monotonic() + 60
    while r.status in ("queued", "in_progress") and time.monotonic() < deadline:
        time.sleep(0.05)
        r = client.responses.retrieve(r.id)
    assert r.status == "incomplete" and r.usage.output_tokens == 6
    engine = server[0].state.server.engine
    long = _create(client, background=True, max_output_tokens=1500)
    cancelled = client.responses.cancel(long.id)
    assert cancelled.status == "cancelled"
    assert client.responses.retrieve(long.id).status == "cancelled"
    deadline = time.monotonic() + 30
    while engine.stats()["running"] and time.monotonic() < deadline:  # aborted in the engine
        time.sleep(0.05)
    assert engine.stats()["running"] == 0
    with pytest.raises(openai.BadRequestError):
        client.responses.cancel(_create(client, max_output_tokens=1).id)  # not background


def test_stream_disconnect_aborts(server):
    engine = server[0].state.server.engine
    before = engine.stats()["aborted"]
    body = {"model": MODEL_ID, "input": "Hi", "max_output_tokens": 1500, "stream": True}
    with httpx.stream("POST", server[1] + "/v1/responses", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if "output_text.delta" in line:
                break  # leave mid-stream
    deadline = time.monotonic() + 30
    while engine.stats()["aborted"] == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.stats()["aborted"] > before


# ---------------------------------------------------------------- errors


def _error(exc_info) -> dict:
    return exc_info.value.response.json()["error"]


def test_unknown_previous_response_id(client):
    with pytest.raises(openai.NotFoundError) as e:
        _create(client, previous_response_id="resp_doesnotexist")
    err = _error(e)
    assert err["param"] == "previous_response_id" and "resp_doesnotexist" in err["message"]
    assert err["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_nope")
    with pytest.raises(openai.NotFoundError):
        client.responses.input_items.list("resp_nope")


def test_unsupported_tool_types_are_named(client):
    tools = [*TOOLS, {"type": "web_search"}, {"type": "file_search", "vector_store_ids": ["v"]}]
    with pytest.raises(openai.BadRequestError) as e:
        _create(client, tools=tools)
    err = _error(e)
    assert "web_search" in err["message"] and "file_search" in err["message"]
    assert err["param"] == "tools"


def test_bad_input_items(client):
    with pytest.raises(openai.BadRequestError) as e:
        _create(client, input=[{"type": "computer_call_output", "call_id": "x"}])
    assert _error(e)["param"] == "input[0].type"
    with pytest.raises(openai.BadRequestError) as e:
        _create(client, input=[{"type": "function_call_output", "output": "x"}])
    assert _error(e)["param"] == "input[0].call_id"
    with pytest.raises(openai.BadRequestError) as e:
        _create(client, input=[{"role": "robot", "content": "x"}])
    assert _error(e)["param"] == "input[0].role"


@pytest.mark.parametrize(
    ("field", "value", "param"),
    [("input", 5, "input"), ("input", [{"role": "user", "content": [5]}], "input[0].content[0]"),
     ("input", [{"type": "reasoning", "summary": 5}], "input[0].summary"),
     ("input", [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{"}],
      "input[0].arguments"),
     ("tools", [{"type": "namespace", "name": "n", "tools": 5}], "tools[0].tools"),
     ("tool_choice", "required", "tool_choice"), ("text", {"format": "json"}, "text.format"),
     ("text", {"format": {"type": "json_schema"}}, "text.format.schema"),
     ("reasoning", {"effort": "max"}, "reasoning.effort"), ("metadata", {"a": 1}, "metadata.a"),
     ("max_output_tokens", 0, "max_output_tokens"), ("stop", [5], "stop"),
     ("background", True, "background"), ("conversation", "conv_1", "conversation")],
)  # fmt: skip
def test_malformed_fields_are_400s_naming_them(server, field, value, param):
    body = {"model": MODEL_ID, "input": "Hi", "max_output_tokens": 1, "store": False,
            field: value}  # fmt: skip
    r = httpx.post(server[1] + "/v1/responses", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_input_image_is_refused(client):
    content = [
        {"type": "input_text", "text": "What is this?"},
        {"type": "input_image", "image_url": "data:image/png;base64,AAAA"},
    ]
    with pytest.raises(openai.BadRequestError) as e:
        _create(client, input=[{"role": "user", "content": content}])
    err = _error(e)
    assert err["param"] == "input[0].content[1].type" and "text only" in err["message"]


def test_unknown_fields_are_reported_or_refused(server, tiny_llama):
    body = {"model": MODEL_ID, "input": "Hi", "max_output_tokens": 1, "frobnicate": 1, "zz": 2}
    r = httpx.post(server[1] + "/v1/responses", json=body, timeout=60)
    assert r.status_code == 200 and r.headers["x-mlxrun-ignored-fields"] == "frobnicate,zz"
    plain = {k: v for k, v in body.items() if k not in ("frobnicate", "zz")}
    r = httpx.post(server[1] + "/v1/responses", json=plain, timeout=60)
    assert r.status_code == 200 and "x-mlxrun-ignored-fields" not in r.headers
    with serve_in_thread(make_app(tiny_llama, context=256, strict=True)) as url:
        r = httpx.post(url + "/v1/responses", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "frobnicate"


def test_prompt_past_the_context(client):
    with pytest.raises(openai.BadRequestError) as e:
        _create(client, input=_words(3, 3000))
    assert _error(e)["code"] == "context_length_exceeded"


def test_a_failure_mid_stream_is_response_failed(client, monkeypatch):
    real = responses_routes.message_deltas

    async def breaking(gen, plan):
        async for d in real(gen, plan):
            yield d
            raise RuntimeError("the engine broke")

    monkeypatch.setattr(responses_routes, "message_deltas", breaking)
    stream = client.responses.create(model=MODEL_ID, input="Hi", max_output_tokens=20,
                                     stream=True, **GREEDY)  # fmt: skip
    events = list(stream)
    last = events[-1]
    assert last.type == "response.failed" and last.response.status == "failed"
    assert last.response.error.code == "server_error"
    assert client.responses.retrieve(last.response.id).status == "failed"


# ---------------------------------------------------------------- reasoning


def test_thinking_model_gives_reasoning_items(thinking_model):
    with serve_in_thread(make_app(thinking_model, context=512)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        r = _create(client, reasoning={"effort": "low"}, max_output_tokens=6)
        with client.responses.stream(model=MODEL_ID, input="Write a function.",
                                     reasoning={"effort": "low"}, max_output_tokens=6,
                                     **GREEDY) as stream:  # fmt: skip
            events = list(stream)
        raw = _raw_events(url, reasoning={"effort": "low"}, max_output_tokens=6)
    final = events[-1].response  # response.incomplete
    assert "response.reasoning_text.delta" in {e["type"] for e in raw}  # validated strictly
    [item] = r.output  # random weights never close the think block within 6 tokens
    assert item.type == "reasoning" and item.content[0].type == "reasoning_text"
    assert item.content[0].text and r.output_text == ""
    assert r.reasoning.effort == "low" and r.usage.output_tokens_details.reasoning_tokens > 0
    deltas = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert deltas == item.content[0].text == final.output[0].content[0].text


# ---------------------------------------------------------------- the store


def test_responses_dir_survives_a_restart(tiny_llama, tmp_path):
    directory = str(tmp_path / "store")
    with serve_in_thread(make_app(tiny_llama, context=512, responses_dir=directory)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        first = _create(client, max_output_tokens=2)
    with serve_in_thread(make_app(tiny_llama, context=512, responses_dir=directory)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        assert client.responses.retrieve(first.id).output_text == first.output_text
        follow = _create(client, previous_response_id=first.id, max_output_tokens=2)
    assert follow.usage.input_tokens > first.usage.input_tokens + 2


def test_serve_responses_dir_flag(tiny_llama, tmp_path):
    """`mlxrun serve --responses-dir`: stored responses land there, private to the user."""
    directory = tmp_path / "kept"
    proc, url = start_cli(tiny_llama, "--responses-dir", str(directory))
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        r = client.responses.create(model=tiny_llama.name, input="Hi", max_output_tokens=1)
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
    assert [p.name for p in directory.iterdir()] == [f"{r.id}.json"]
    assert directory.stat().st_mode & 0o777 == 0o700
    assert json.loads((directory / f"{r.id}.json").read_text())["response"]["id"] == r.id


def test_serve_unusable_responses_dir_is_one_line(tiny_llama, tmp_path):
    (tmp_path / "file").write_text("x")
    proc = subprocess.run([*CLI, str(tiny_llama), "--port", "0", "--responses-dir",
                           str(tmp_path / "file" / "sub")], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert len(lines) == 1 and lines[0].startswith("Error: --responses-dir"), proc.stderr
