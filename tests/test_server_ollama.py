"""The Ollama API as Ollama clients use it: the official `ollama` client (sync and async) against a
real server (uvicorn on loopback, the real engine, a tiny random-weight model: gibberish text, so
greedy decoding and short outputs), plus raw httpx for what the client cannot send."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from datetime import datetime

import httpx
import jsonschema
import ollama
import pytest
from ollama._types import ChatRequest as OllamaChatRequest
from ollama._types import ChatResponse

from mlxrun.server.protocol_tools import function_tool
from mlxrun.tokenizer import load_tokenizer
from serverutil import MODEL_ID, WEATHER, make_app, serve_in_thread

pytestmark = pytest.mark.server

GREEDY = {"temperature": 0, "seed": 7, "num_predict": 8}
MESSAGES = [{"role": "user", "content": "Write a function that adds two numbers."}]
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather.", "parameters": WEATHER},
    }
]


@pytest.fixture(scope="module")
def app(tiny_llama):
    return make_app(tiny_llama, aliases=("tiny-alias",))


@pytest.fixture(scope="module")
def base_url(app):
    with serve_in_thread(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return ollama.Client(host=base_url)


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return load_tokenizer(tiny_llama)


def _rfc3339(text: str) -> datetime:
    assert text.endswith("Z")
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"] and isinstance(body["error"], str)
    return body["error"]


# ---------------------------------------------------------------- model listing


def test_version_root_and_unsupported_endpoints(base_url, client):
    version = httpx.get(base_url + "/api/version").json()["version"]
    assert tuple(int(x) for x in version.split(".")) >= (0, 6, 4)  # what VS Code asks for
    assert httpx.get(base_url + "/").text == "Ollama is running"
    assert httpx.head(base_url + "/").status_code == 200
    with pytest.raises(ollama.ResponseError) as e:
        client.embed(MODEL_ID, "text")
    assert e.value.status_code == 501 and "embeddings" in e.value.error
    _error(httpx.post(base_url + "/api/pull", json={"model": MODEL_ID}), 501)
    _error(httpx.post(base_url + "/api/pull", json={"model": "x"}), 404)  # never looked up


def test_tags_show_and_ps(client, tiny_llama):
    models = client.list().models
    assert [m.model for m in models] == ["tiny:latest", "tiny-alias:latest"]
    weights = sum(f.stat().st_size for f in tiny_llama.glob("*.safetensors"))
    for m in models:
        assert m.size == weights and len(m.digest) == 64
        assert m.details.format == "mlx" and m.details.family == "llama"
        assert m.details.parameter_size.endswith("K") and m.details.quantization_level == "f32"
        assert m.modified_at.tzinfo is not None
    info = client.show("tiny:latest")
    assert info.capabilities == ["completion", "tools", "insert"]
    assert info.modelinfo["general.architecture"] == "llama"
    assert info.modelinfo["llama.context_length"] == 512
    assert info.modelinfo["llama.block_count"] == 2
    assert "<|im_start|>" in info.template and "num_ctx 512" in info.parameters
    assert client.show("tiny-alias").details.family == "llama"
    (running,) = client.ps().models
    assert running.model == "tiny:latest" and running.size_vram == weights
    assert running.context_length == 512 and running.expires_at.year > 2100
    with pytest.raises(ollama.ResponseError) as e:
        client.show("llama3:8b")
    assert e.value.status_code == 404
    assert e.value.error == (
        "model 'llama3:8b' not found; this server serves: tiny:latest, tiny-alias:latest"
    )


# ---------------------------------------------------------------- chat


def test_chat_streamed_equals_non_streamed(client):
    whole = client.chat(MODEL_ID, messages=MESSAGES, options=GREEDY)
    assert whole.done and whole.done_reason == "length" and whole.message.role == "assistant"
    assert whole.eval_count == 8 and whole.prompt_eval_count > 8
    assert whole.total_duration >= whole.prompt_eval_duration > 0 and whole.eval_duration > 0
    _rfc3339(whole.created_at)
    parts = list(client.chat("tiny:latest", messages=MESSAGES, options=GREEDY, stream=True))
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert all(p.model == "tiny:latest" for p in parts)
    assert "".join(p.message.content for p in parts) == whole.message.content
    last = parts[-1]
    assert last.done_reason == "length" and last.eval_count == 8 and last.message.content == ""
    assert last.prompt_eval_count == whole.prompt_eval_count


def test_logprobs(client):
    reply = client.chat(MODEL_ID, messages=MESSAGES, options=GREEDY, logprobs=True, top_logprobs=2)
    assert len(reply.logprobs) == reply.eval_count == 8
    assert "".join(lp.token for lp in reply.logprobs) == reply.message.content
    for lp in reply.logprobs:
        assert lp.logprob <= 0 and len(lp.top_logprobs) == 2
        assert lp.top_logprobs[0].logprob >= lp.logprob - 1e-5  # greedy took the best
    parts = list(
        client.generate(MODEL_ID, "hi", raw=True, options=GREEDY, logprobs=True, stream=True)
    )
    assert sum(len(p.logprobs or ()) for p in parts) == 8


def test_async_client_streams(base_url, client):
    expected = client.chat(MODEL_ID, messages=MESSAGES, options=GREEDY).message.content

    async def run() -> tuple[str, str]:
        aclient = ollama.AsyncClient(host=base_url)
        whole = await aclient.chat(MODEL_ID, messages=MESSAGES, options=GREEDY)
        parts = [p async for p in await aclient.chat(
            MODEL_ID, messages=MESSAGES, options=GREEDY, stream=True)]  # fmt: skip
        return whole.message.content, "".join(p.message.content for p in parts)

    assert asyncio.run(run()) == (expected, expected)


def _as_sent(tools):
    """The tools as the client sends them (its Tool model keeps only some schema keywords) and the
    server hands them to the template."""
    sent = OllamaChatRequest(model=MODEL_ID, tools=tools).model_dump(exclude_none=True)["tools"]
    return [
        function_tool(f["name"], f.get("description"), f.get("parameters"), "tools")
        for f in (t["function"] for t in sent)
    ]


def test_history_with_tool_calls_renders_into_the_prompt(client, tokenizer):
    history = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "thinking": "The user wants the weather.",
            "tool_calls": [
                {
                    "function": {
                        "name": "get_weather",
                        "arguments": {"city": "Paris", "unit": "celsius"},
                    }
                }
            ],
        },
        {"role": "tool", "tool_name": "get_weather", "content": "21 degrees"},
    ]
    reply = client.chat(MODEL_ID, messages=history, tools=TOOLS, options=GREEDY)
    assert reply.done and reply.eval_count == 8
    # The same conversation in the neutral shape, rendered by the model's template with the tools.
    call = {"city": "Paris", "unit": "celsius"}
    neutral = [
        *history[:2],
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_2_0", "type": "function",
             "function": {"name": "get_weather", "arguments": call}}]},
        {"role": "tool", "tool_call_id": "call_2_0", "name": "get_weather", "content": "21 degrees"},
    ]  # fmt: skip
    ids = tokenizer.apply_chat_template(neutral, tools=_as_sent(TOOLS))
    assert reply.prompt_eval_count == len(ids)
    text = tokenizer.decode(ids)
    assert '"name": "get_weather"' in text and "<tools>" in text and "21 degrees" in text
    bare = client.chat(MODEL_ID, messages=history, options=GREEDY)
    assert bare.prompt_eval_count < reply.prompt_eval_count  # no tools: none in the prompt


def test_forced_tool_call_parses_as_ollama_tool_calls(base_url):
    # tool_choice is an mlxrun extension (Ollama has none): it forces a call on random weights.
    body = {"model": MODEL_ID, "messages": MESSAGES, "tools": TOOLS, "tool_choice": "required",
            "options": {"temperature": 0, "num_predict": 120}}  # fmt: skip
    raw = httpx.post(base_url + "/api/chat", json={**body, "stream": False}, timeout=60).json()
    whole = ChatResponse(**raw)
    assert whole.done_reason == "stop" and whole.message.tool_calls
    for call in whole.message.tool_calls:
        assert call.function.name == "get_weather"
        jsonschema.validate(dict(call.function.arguments), WEATHER)
    assert raw["message"]["tool_calls"][0]["id"].startswith("call_")
    with httpx.stream("POST", base_url + "/api/chat", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("application/x-ndjson")
        parts = [ChatResponse(**json.loads(line)) for line in r.iter_lines()]
    streamed = [c for p in parts for c in p.message.tool_calls or ()]
    assert [c.function for c in streamed] == [c.function for c in whole.message.tool_calls]


def test_format_json_and_schema(client):
    reply = client.chat(MODEL_ID, messages=MESSAGES, format=WEATHER,
                        options={"temperature": 0, "num_predict": 100})  # fmt: skip
    assert reply.done_reason == "stop"
    jsonschema.validate(json.loads(reply.message.content), WEATHER)
    parts = list(client.generate(MODEL_ID, "Weather?", format=WEATHER, stream=True,
                                 options={"temperature": 0.9, "seed": 3, "num_predict": 100}))  # fmt: skip
    jsonschema.validate(json.loads("".join(p.response for p in parts)), WEATHER)
    # Random weights rarely close a free-form object, but it always starts as one.
    text = client.generate(MODEL_ID, "Reply in JSON.", format="json", options=GREEDY).response
    assert text.startswith("{")
    raw = client.generate(MODEL_ID, "x", raw=True, format=WEATHER, options={"num_predict": 100})
    jsonschema.validate(json.loads(raw.response), WEATHER)


def test_num_predict_and_stop(client):
    reply = client.chat(MODEL_ID, messages=MESSAGES, options={**GREEDY, "num_predict": 3})
    assert reply.eval_count == 3 and reply.done_reason == "length"
    options = {**GREEDY, "num_predict": 12}
    long = client.generate(MODEL_ID, "def add(a, b):", raw=True, options=options)
    stop = long.response[4:7]
    cut = client.generate(MODEL_ID, "def add(a, b):", raw=True, options={**options, "stop": [stop]})
    assert cut.done_reason == "stop" and cut.response == long.response[: long.response.index(stop)]
    # num_predict -1: whatever the context (512) leaves, unless eos comes first.
    prompt = "hi " * 250
    full = client.generate(
        MODEL_ID, prompt, raw=True, options={"temperature": 0, "num_predict": -1}
    )
    assert full.prompt_eval_count > 250
    if full.done_reason == "length":
        assert full.prompt_eval_count + full.eval_count == 512


# ---------------------------------------------------------------- generate


def test_generate_streamed_raw_and_templated(client, tokenizer):
    whole = client.generate(MODEL_ID, "Hello there", options=GREEDY)
    parts = list(client.generate(MODEL_ID, "Hello there", options=GREEDY, stream=True))
    assert "".join(p.response for p in parts) == whole.response
    assert parts[-1].done and parts[-1].done_reason == "length" and parts[-1].eval_count == 8
    chatted = client.chat(MODEL_ID, messages=[{"role": "user", "content": "Hello there"}],
                          options=GREEDY)  # fmt: skip
    assert chatted.message.content == whole.response  # the chat template, one user turn
    system = client.generate(MODEL_ID, "Hello there", system="Be brief.", options=GREEDY)
    assert system.prompt_eval_count > whole.prompt_eval_count
    raw = client.generate(MODEL_ID, "def add(a, b):", raw=True, options=GREEDY)
    assert raw.prompt_eval_count == len(tokenizer.encode("def add(a, b):"))


def test_generate_suffix_is_fill_in_the_middle(client, tokenizer):
    reply = client.generate(MODEL_ID, "def add(a, b):\n", suffix="    return c\n", options=GREEDY)
    ids = tokenizer.build_fim_prompt("def add(a, b):\n", "    return c\n")
    assert reply.prompt_eval_count == len(ids) and reply.eval_count == 8


# Greedy without Ollama's default repeat penalty: the tiny model writes the same long gibberish as
# the OpenAI dialect's FIM tests, which never meets eos within LONG tokens.
AUTOCOMPLETE = {"temperature": 0, "repeat_last_n": 0}
CURSOR = ("def f(a, b):\n    ret", "\n\nprint(f(1, 2))\n")  # (text before, text after)
LONG = 400  # tokens for a request that must still be running when its successor arrives


def test_newer_autocomplete_cancels_the_stale_stream(app, base_url, client):
    engine = app.state.server.engine
    before = engine.stats()["group_cancellations"]
    prefix, suffix = CURSOR
    stale = {"model": MODEL_ID, "prompt": prefix, "suffix": suffix,
             "options": {**AUTOCOMPLETE, "num_predict": LONG}}  # fmt: skip
    with httpx.stream("POST", base_url + "/api/generate", json=stale, timeout=120) as r:
        lines = (json.loads(line) for line in r.iter_lines())
        assert next(f for f in lines if f["response"])  # generating
        # The same client typed on: same suffix, the prefix one character longer.
        typed_on = client.generate(MODEL_ID, prefix + "u", suffix=suffix,
                                   options={**AUTOCOMPLETE, "num_predict": 2})  # fmt: skip
        rest = list(lines)
    assert typed_on.done_reason == "length" and typed_on.eval_count == 2
    final = rest[-1]  # the stale stream ends with a proper last line, not a cut connection
    assert final["done"] is True and final["done_reason"] == "stop" and final["response"] == ""
    assert 0 < final["eval_count"] < LONG
    assert not any(f["done"] for f in rest[:-1])
    assert engine.stats()["group_cancellations"] == before + 1
    assert app.state.fim_groups.in_flight() == 0  # both responses released their entries


def test_group_header_cancels_a_non_streamed_request(app, base_url):
    engine = app.state.server.engine
    before = engine.stats()["group_cancellations"]
    headers = {"X-Mlxrun-Group": "editor-1"}
    stale = {"model": MODEL_ID, "prompt": "import os\n", "suffix": "\n", "stream": False,
             "options": {**AUTOCOMPLETE, "num_predict": LONG}}  # fmt: skip
    replies: list[httpx.Response] = []
    thread = threading.Thread(
        target=lambda: replies.append(
            httpx.post(base_url + "/api/generate", json=stale, headers=headers, timeout=120)
        )
    )
    thread.start()
    deadline = time.monotonic() + 30
    while not engine.stats()["running"]:
        assert time.monotonic() < deadline, "the first request never ran"
        time.sleep(0.005)
    # Elsewhere in the file (no lineage), but the editor names the same group.
    newer = {"model": MODEL_ID, "prompt": "x = ", "suffix": "\n", "stream": False,
             "options": {**AUTOCOMPLETE, "num_predict": 2}}  # fmt: skip
    fresh = httpx.post(base_url + "/api/generate", json=newer, headers=headers, timeout=120)
    thread.join(timeout=120)
    assert fresh.json()["done_reason"] == "length" and fresh.json()["eval_count"] == 2
    (reply,) = replies
    assert reply.status_code == 200
    body = reply.json()  # what it had, as a finished answer
    assert body["done"] is True and body["done_reason"] == "stop"
    assert body["eval_count"] < LONG and isinstance(body["response"], str)
    assert engine.stats()["group_cancellations"] == before + 1


def test_load_and_unload_calls(base_url, client):
    loaded = client.generate(MODEL_ID)
    assert loaded.done and loaded.done_reason == "load" and loaded.response == ""
    r = httpx.post(base_url + "/api/chat", json={"model": "tiny:latest", "messages": []})
    assert r.json()["done_reason"] == "load" and r.json()["message"]["content"] == ""
    r = httpx.post(base_url + "/api/generate", json={"model": MODEL_ID, "keep_alive": 0})
    assert r.json()["done_reason"] == "unload"
    assert client.ps().models  # the one model stays loaded


# ---------------------------------------------------------------- errors and options


def test_unknown_model_is_404(base_url, client):
    with pytest.raises(ollama.ResponseError) as e:
        client.chat("llama3", messages=MESSAGES)
    assert e.value.status_code == 404 and "llama3" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        list(client.generate("nope:7b", "hi", stream=True))
    assert e.value.status_code == 404
    assert "required" in _error(httpx.post(base_url + "/api/chat", json={"messages": []}), 400)


@pytest.mark.parametrize(
    ("options", "where"),
    [
        ({"temperature": "hot"}, "options.temperature"),
        ({"num_predict": 1.5}, "options.num_predict"),
        ({"stop": [1]}, "options.stop"),
        ({"use_mmap": "yes"}, "options.use_mmap"),
        ({"top_p": 0}, "top_p"),
    ],
)
def test_bad_option_types_are_400(client, options, where):
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(MODEL_ID, messages=MESSAGES, options=options)
    assert e.value.status_code == 400 and where in e.value.error


def test_every_documented_option_is_accepted(client):
    # The full set Ollama's API docs send: runner options and samplers we do not have are ignored.
    options = {"num_keep": 5, "seed": 42, "num_predict": 4, "top_k": 20, "top_p": 0.9,
               "min_p": 0.0, "typical_p": 0.7, "repeat_last_n": 33, "temperature": 0.8,
               "repeat_penalty": 1.2, "presence_penalty": 1.5, "frequency_penalty": 1.0,
               "mirostat": 1, "mirostat_tau": 0.8, "mirostat_eta": 0.6, "penalize_newline": True,
               "stop": ["\n", "user:"], "numa": False, "num_ctx": 1024, "num_batch": 2,
               "num_gpu": 1, "main_gpu": 0, "low_vram": False, "vocab_only": False,
               "use_mmap": True, "use_mlock": False, "num_thread": 8, "not_an_option": 1}  # fmt: skip
    reply = client.generate(MODEL_ID, "Why is the sky blue?", options=options, keep_alive="5m")
    assert reply.done and reply.eval_count <= 4
    again = client.generate(MODEL_ID, "Why is the sky blue?", options=options)
    assert again.response == reply.response  # seeded


def test_unsupported_fields_are_clear_400s(base_url):
    def post(path, **body):
        return httpx.post(base_url + path, json={"model": MODEL_ID, "stream": False, **body})

    image = "iVBORw0KGgo="
    msg = [{"role": "user", "content": "what is this?", "images": [image]}]
    assert "images" in _error(post("/api/chat", messages=msg), 400)
    assert "images" in _error(post("/api/generate", prompt="x", images=[image]), 400)
    assert "template" in _error(post("/api/generate", prompt="x", template="{{ .Prompt }}"), 400)
    assert "context" in _error(post("/api/generate", prompt="x", context=[1, 2]), 400)
    assert "system" in _error(post("/api/generate", prompt="x", raw=True, system="s"), 400)
    assert "format" in _error(post("/api/chat", messages=MESSAGES, format="yaml"), 400)
    assert "think" in _error(post("/api/chat", messages=MESSAGES, think="maybe"), 400)
    assert "role" in _error(post("/api/chat", messages=[{"role": "bot", "content": "x"}]), 400)
    tools = [{"type": "function", "function": {"name": "bad name!"}}]
    assert "tools[0]" in _error(post("/api/chat", messages=MESSAGES, tools=tools), 400)
    long = "word " * 600
    assert "context length" in _error(post("/api/generate", prompt=long), 400)


def test_model_without_fim_or_tools(checkpoint_factory):
    spm = checkpoint_factory("llama", tokenizer="spm")  # [INST] template, no FIM tokens, no tools
    with serve_in_thread(make_app(spm)) as url:
        client = ollama.Client(host=url)
        assert client.show(MODEL_ID).capabilities == ["completion"]
        with pytest.raises(ollama.ResponseError) as e:
            client.generate(MODEL_ID, "def f():", suffix="return 1", options=GREEDY)
        assert e.value.status_code == 400 and "fill-in-the-middle" in e.value.error
        with pytest.raises(ollama.ResponseError) as e:
            client.chat(MODEL_ID, messages=MESSAGES, tools=TOOLS, options=GREEDY)
        assert e.value.status_code == 400 and "tools" in e.value.error


def test_thinking_is_split_into_its_own_field(thinking_model):
    with serve_in_thread(make_app(thinking_model)) as url:
        client = ollama.Client(host=url)
        assert "thinking" in client.show(MODEL_ID).capabilities
        whole = client.chat(MODEL_ID, messages=MESSAGES, think=True, options=GREEDY)
        assert whole.message.thinking and whole.message.content == ""
        parts = list(
            client.chat(MODEL_ID, messages=MESSAGES, think=True, options=GREEDY, stream=True)
        )
        assert "".join(p.message.thinking or "" for p in parts) == whole.message.thinking
        gen = client.generate(MODEL_ID, "Hello", think=True, options=GREEDY)
        assert gen.thinking and gen.response == ""
        history = [*MESSAGES, {"role": "assistant", "content": "4", "thinking": "2+2"}, *MESSAGES]
        assert client.chat(MODEL_ID, messages=history, options=GREEDY).done


def _gauge(base_url: str, name: str) -> float:
    for line in httpx.get(base_url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_disconnect_mid_stream_aborts(base_url, client):
    aborted = _gauge(base_url, "mlxrun_aborted_requests_total")
    body = {"model": MODEL_ID, "messages": MESSAGES, "options": {"num_predict": 450, "seed": 1}}
    with httpx.stream("POST", base_url + "/api/chat", json=body, timeout=60) as r:
        lines = r.iter_lines()
        first = [json.loads(next(lines)) for _ in range(3)]
    assert not any(f["done"] for f in first)
    deadline = time.monotonic() + 10
    while _gauge(base_url, "mlxrun_requests_running") or (
        _gauge(base_url, "mlxrun_aborted_requests_total") == aborted
    ):
        assert time.monotonic() < deadline, "the engine request was not aborted"
        time.sleep(0.05)
    assert client.chat(MODEL_ID, messages=MESSAGES, options=GREEDY).eval_count == 8
