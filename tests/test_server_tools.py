"""Tools, structured output and reasoning on /v1/chat/completions with the official `openai`
client against a real server. Random weights never call a tool by themselves, so calls are
forced with tool_choice "required" or a named function (the grammar makes them valid)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

from serverutil import ADD, MODEL_ID, WEATHER, make_app, serve_in_thread

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "add", "description": "Adds.", "parameters": ADD}},
]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
GREEDY = {"temperature": 0, "max_tokens": 120}


@pytest.fixture(scope="module")
def server(tiny_llama):
    app = make_app(tiny_llama, context=2048)
    with serve_in_thread(app) as url:
        yield app, url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key="unused", max_retries=0)


def _chat(client, **kw):
    return client.chat.completions.create(**{"model": MODEL_ID, "messages": MESSAGES, **kw})


def _check_calls(calls, names=None):
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert names is None or call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def _reassemble(stream):
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            for d in choice.delta.tool_calls or ():
                call = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
                if d.id:
                    assert call["id"] is None, "the id comes once, on the call's first delta"
                    call["id"] = d.id
                if d.function and d.function.name:
                    assert call["name"] is None
                    call["name"] = d.function.name
                if d.function and d.function.arguments:
                    call["arguments"] += d.function.arguments
            finish = choice.finish_reason or finish
    return [calls[i] for i in sorted(calls)], finish


@pytest.mark.server
def test_required_tool_call_is_valid_and_streams_the_same(client):
    reply = _chat(client, tools=TOOLS, tool_choice="required", **GREEDY)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    _check_calls(choice.message.tool_calls)
    stream = _chat(client, tools=TOOLS, tool_choice="required", stream=True, **GREEDY)
    streamed, finish = _reassemble(stream)
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in streamed] == [
        (c.function.name, c.function.arguments) for c in choice.message.tool_calls
    ]
    assert all(c["id"].startswith("call_") for c in streamed)


@pytest.mark.server
def test_sampled_required_calls_always_validate(client):
    for seed in range(3):
        reply = _chat(
            client, tools=TOOLS, tool_choice="required", temperature=1.0, seed=seed, max_tokens=200
        )
        assert reply.choices[0].finish_reason == "tool_calls"
        _check_calls(reply.choices[0].message.tool_calls)


@pytest.mark.server
def test_named_tool_choice_calls_exactly_that_function(client):
    named = {"type": "function", "function": {"name": "add"}}
    for seed in range(2):
        reply = _chat(
            client, tools=TOOLS, tool_choice=named, temperature=1.0, seed=seed, max_tokens=80
        )
        calls = reply.choices[0].message.tool_calls
        assert len(calls) == 1  # a named choice is one call
        _check_calls(calls, names={"add"})


@pytest.mark.server
def test_tool_choice_none_leaves_the_tools_out(client):
    plain = _chat(client, **GREEDY)
    none = _chat(client, tools=TOOLS, tool_choice="none", **GREEDY)
    auto = _chat(client, tools=TOOLS, **GREEDY)
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens
    assert none.choices[0].message.tool_calls is None
    assert none.choices[0].finish_reason in ("stop", "length")
    assert auto.usage.prompt_tokens > plain.usage.prompt_tokens  # the template lists the tools


@pytest.mark.server
def test_tool_results_round_trip_through_the_template(server, client):
    app = server[0]
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'},
    }
    messages = [
        {"role": "user", "content": "add 2 and 3"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "5"},
    ]
    reply = _chat(client, messages=messages, tools=TOOLS, **GREEDY)
    tokenizer = app.state.server.tokenizer
    neutral = [
        messages[0],
        {**messages[1], "content": "", "tool_calls": [
            {**call, "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}
        ]},
        {"role": "tool", "content": "5", "tool_call_id": "call_1"},
    ]  # fmt: skip
    text = tokenizer.render_chat(neutral, tools=TOOLS)
    assert "<tool_response>\n5\n</tool_response>" in text and '"a": 2' in text
    assert reply.usage.prompt_tokens == len(tokenizer.apply_chat_template(neutral, tools=TOOLS))


@pytest.mark.server
def test_json_schema_output_validates_beside_unconstrained_requests(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER}}

    def constrained(seed):
        return _chat(client, response_format=fmt, temperature=1.0, seed=seed, max_tokens=80, n=2)

    def free(seed):
        return _chat(client, temperature=1.0, seed=seed, max_tokens=30)

    with ThreadPoolExecutor(6) as pool:
        jobs = [pool.submit(constrained, s) for s in range(3)]
        jobs += [pool.submit(free, s) for s in range(3)]
        replies = [j.result() for j in jobs]
    for reply in replies[:3]:
        for choice in reply.choices:
            assert choice.finish_reason == "stop"
            jsonschema.validate(json.loads(choice.message.content), WEATHER)
    assert all(r.choices[0].message.content is not None for r in replies[3:])


@pytest.mark.server
def test_json_object_and_grammar_formats(client):
    reply = _chat(client, response_format={"type": "json_object"}, temperature=0, max_tokens=60)
    text = reply.choices[0].message.content
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    assert text.startswith("{")
    grammar = 'root ::= "yes" | "no"'
    for seed in range(3):
        reply = _chat(client, extra_body={"grammar": grammar}, temperature=1.0, seed=seed)
        assert reply.choices[0].message.content in ("yes", "no")


@pytest.mark.server
def test_unsupported_schema_and_tool_errors_are_400s(client):
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "(?=x)"}}}}}  # fmt: skip
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, response_format=bad, max_tokens=5)
    assert e.value.body["param"] == "response_format"
    assert "look-around" in e.value.body["message"]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"if": {"type": "string"}, "then": {}}}}}}]  # fmt: skip
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, tools=tools, tool_choice="required", max_tokens=5)
    assert e.value.body["param"] == "tools"
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, tools=TOOLS, tool_choice="required", response_format={"type": "json_object"})
    assert e.value.body["param"] == "response_format"
    with pytest.raises(openai.BadRequestError) as e:
        named = {"type": "function", "function": {"name": "nope"}}
        _chat(client, tools=TOOLS, tool_choice=named)
    assert e.value.body["param"] == "tool_choice"


@pytest.mark.server
def test_a_model_without_a_tool_template_refuses_tools(checkpoint_factory):
    spm = checkpoint_factory("llama", tokenizer="spm")  # [INST] template, no tools
    with serve_in_thread(make_app(spm)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.BadRequestError) as e:
            _chat(client, tools=TOOLS, max_tokens=4)
        assert e.value.body["param"] == "tools"
        assert client.models.retrieve(MODEL_ID).model_extra["capabilities"]["tools"] is False
        ok = _chat(client, tools=TOOLS, tool_choice="none", max_tokens=4, temperature=0)
        assert ok.choices[0].message.tool_calls is None


# ---------------------------------------------------------------- reasoning


@pytest.mark.server
def test_reasoning_is_split_into_reasoning_content(thinking_model):
    # The grammar makes random weights think first: "<reasoning></think>\n\n<answer>".
    grammar = 'root ::= [a-z ]{3,20} "</think>" "\\n\\n" [a-z]{1,8}'
    with serve_in_thread(make_app(thinking_model)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        assert client.models.retrieve(MODEL_ID).model_extra["capabilities"]["reasoning"] is True
        body = {"grammar": grammar}
        reply = _chat(client, extra_body=body, temperature=1.0, seed=3, max_tokens=60)
        message = reply.choices[0].message
        reasoning = message.model_extra["reasoning_content"]
        assert reasoning and set(reasoning) <= set("abcdefghijklmnopqrstuvwxyz \n")
        assert "think>" not in message.content and message.content.strip().isalpha()
        stream = _chat(client, extra_body=body, temperature=1.0, seed=3, max_tokens=60, stream=True)
        parts = {"reasoning": "", "content": ""}
        for chunk in stream:
            delta = chunk.choices[0].delta if chunk.choices else None
            if delta is not None:
                parts["reasoning"] += (delta.model_extra or {}).get("reasoning_content") or ""
                parts["content"] += delta.content or ""
        assert parts == {"reasoning": reasoning, "content": message.content}


@pytest.mark.server
def test_completions_take_a_schema_or_grammar_too(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "add", "schema": ADD}}
    reply = client.completions.create(
        model=MODEL_ID, prompt="def f():", max_tokens=60, temperature=1.0, seed=1, n=2,
        extra_body={"response_format": fmt},
    )  # fmt: skip
    for choice in reply.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.text), ADD)
    reply = client.completions.create(
        model=MODEL_ID, prompt="x", max_tokens=5, extra_body={"grammar": 'root ::= "a" | "b"'}
    )
    assert reply.choices[0].text in ("a", "b")


@pytest.mark.pure
def test_alias_patterns_accept_matching_names_without_listing_them():
    from mlxrun.server.state import ServerConfig

    config = ServerConfig("m", 64, aliases=("claude-*", "short"))
    assert config.model_ids == ("m", "short")
    for name in ("m", "short", "m:latest", "claude-sonnet-4-5", "claude-haiku-4-5-20251001"):
        assert config.serves(name), name
    for name in ("gpt-4", "claude", "mm", "short:v2"):
        assert not config.serves(name), name


@pytest.mark.server
def test_an_unknown_tool_parser_fails_before_loading(tiny_llama):
    from click.testing import CliRunner

    from mlxrun.cli import main

    result = CliRunner().invoke(main, ["serve", str(tiny_llama), "--tool-parser", "nope"])
    assert result.exit_code != 0
    assert "unknown tool-call format 'nope'" in result.output and "hermes" in result.output
    for name in ("qwen3_coder", "glm45", "deepseek_v3", "deepseek_v31", "granite", "gpt_oss"):
        assert name in result.output


# ---------------------------------------------------------------- other call formats

# What no client should see in content: the call markup of any family.
MARKUP = ("<tool_call>", "<function=", "<parameter=", "<|tool_call|>", "<|channel|>", "<|message|>",
          "<|call|>", "to=functions", "</")  # fmt: skip


# Bounded numbers: random weights would otherwise write digits up to max_tokens.
SMALL = {"type": "integer", "minimum": 0, "maximum": 99}
BOUNDED_ADD = {**ADD, "properties": {"a": SMALL, "b": SMALL}}
FAMILY_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "add", "parameters": BOUNDED_ADD}},
]


@pytest.fixture(scope="module", params=["qwen3_coder", "granite", "gpt_oss"])
def family_client(request, tiny_llama, tmp_path_factory):
    from fixtures.tool_models import family_checkpoint

    out = tmp_path_factory.mktemp(request.param) / "model"
    path = family_checkpoint(tiny_llama, out, request.param)
    with serve_in_thread(make_app(path, context=2048)) as url:
        yield request.param, openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)


@pytest.mark.pure
def test_new_tool_parser_names_pass_the_early_check(tmp_path):
    from click.testing import CliRunner

    from mlxrun.cli import main

    for name in ("qwen3_coder", "glm45", "deepseek_v31", "gpt_oss", "openai"):
        missing = str(tmp_path / "no-model")  # accepted names get as far as loading the model
        result = CliRunner().invoke(main, ["serve", missing, "--tool-parser", name, "--port", "0"])
        assert result.exit_code != 0 and "unknown tool-call format" not in result.output
        assert "no-model" in result.output


@pytest.mark.server
def test_harmony_channels_split_into_reasoning_and_content(tiny_llama, tmp_path):
    from fixtures.tool_models import family_checkpoint
    from mlxrun.tokenizer import load_tokenizer

    path = family_checkpoint(tiny_llama, tmp_path / "m", "gpt_oss")
    vocab = load_tokenizer(path).backend.get_vocab()
    t = {name: f"<[{vocab[f'<|{name}|>']}]>" for name in ("start", "channel", "message", "end")}
    # The grammar makes random weights write what gpt-oss writes: analysis, then a final answer.
    grammar = (
        f'start: {t["channel"]} "analysis" {t["message"]} /[a-z ]{{3,20}}/ {t["end"]} '
        f'{t["start"]} "assistant" {t["channel"]} "final" {t["message"]} /[a-z]{{1,8}}/'
    )
    with serve_in_thread(make_app(path)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        body = {"grammar": grammar}
        reply = _chat(client, extra_body=body, temperature=1.0, seed=2, max_tokens=60)
        message = reply.choices[0].message
        reasoning = message.model_extra["reasoning_content"]
        assert reasoning and set(reasoning) <= set("abcdefghijklmnopqrstuvwxyz ")
        assert message.content.isalpha() and reply.choices[0].finish_reason == "stop"
        stream = _chat(client, extra_body=body, temperature=1.0, seed=2, max_tokens=60, stream=True)
        content, s_reasoning, calls, _ = _stream_parts(stream)
        assert (content, s_reasoning, calls) == (message.content, reasoning, [])


@pytest.mark.server
def test_deepseek_tool_history_renders_with_text_arguments(tiny_llama, tmp_path):
    """DeepSeek's templates concatenate a past call's arguments as text: the history renders."""
    from fixtures.tool_models import family_checkpoint

    path = family_checkpoint(tiny_llama, tmp_path / "m", "deepseek_v3")
    call = {"id": "call_1", "type": "function",
            "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}  # fmt: skip
    messages = [
        {"role": "user", "content": "add 2 and 3"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "5"},
    ]
    with serve_in_thread(make_app(path)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        reply = _chat(client, messages=messages, tools=FAMILY_TOOLS, max_tokens=2, temperature=0)
    from mlxrun.tokenizer import load_tokenizer

    text = load_tokenizer(path).render_chat(messages, tools=FAMILY_TOOLS)
    assert 'add\n```json\n{"a": 2, "b": 3}\n```' in text
    assert reply.usage.prompt_tokens == len(load_tokenizer(path).encode(text, False))


def _stream_parts(stream):
    """(content, reasoning, calls, finish_reason) of a streamed reply."""
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join(
        (c.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
        for c in chunks
        if c.choices
    )
    calls, finish = _reassemble(chunks)
    return content, reasoning, calls, finish


@pytest.mark.server
def test_family_forced_calls_stream_the_same_without_markup(family_client):
    family, client = family_client
    reply = _chat(client, tools=FAMILY_TOOLS, tool_choice="required", temperature=0, max_tokens=300)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", (family, choice)
    assert not choice.message.content  # the call's markup never reaches content
    reasoning = (choice.message.model_extra or {}).get("reasoning_content") or ""
    assert not any(m in reasoning for m in MARKUP)
    _check_calls(choice.message.tool_calls)
    stream = _chat(
        client,
        tools=FAMILY_TOOLS,
        tool_choice="required",
        temperature=0,
        max_tokens=300,
        stream=True,
    )
    content, s_reasoning, calls, finish = _stream_parts(stream)
    assert (content, finish) == ("", "tool_calls")
    assert s_reasoning == reasoning
    assert [(c["name"], c["arguments"]) for c in calls] == [
        (c.function.name, c.function.arguments) for c in choice.message.tool_calls
    ]
    named = {"type": "function", "function": {"name": "add"}}
    called = 0
    for seed in range(3):
        reply = _chat(client, tools=FAMILY_TOOLS, tool_choice=named, temperature=1.0, seed=seed,
                      max_tokens=200)  # fmt: skip
        message = reply.choices[0].message
        assert not message.content
        if reply.choices[0].finish_reason == "length":
            # gpt-oss may reason first (the grammar allows an analysis message), and random
            # weights seldom end it: the reply is then all reasoning, with no markup.
            reasoning = message.model_extra["reasoning_content"]
            assert family == "gpt_oss" and reasoning and message.tool_calls is None
            assert not any(m in reasoning for m in MARKUP)
            continue
        assert reply.choices[0].finish_reason == "tool_calls"
        _check_calls(message.tool_calls, names={"add"})
        called += 1
    assert called > 0
