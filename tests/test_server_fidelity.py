"""Requests as clients in the wild send them, against a real server (uvicorn on loopback, the tiny
model): the peers' own test requests with their vendor fields, Claude Code's first request, and the
same bodies against `serve --strict`, which refuses what it does not know as OpenAI does.

Peers reproduced here (their model-agnostic checks):
- llama.cpp tools/server/tests/unit/test_chat_completion.py, test_chat_completions_multiple_choices
  (n=2), with the id_slot / cache_prompt fields llama.cpp clients add;
- vLLM tests/entrypoints/openai/ (chat tests), test_extra_fields_allowed (an extra key inside a
  message, through the real openai client);
- mlx-lm tests/test_server.py, test_handle_completions (repetition_context_size; same seed, same
  text).
"""

from __future__ import annotations

import json
import logging
import shutil

import anthropic
import httpx
import ollama
import openai
import pytest

from mlxrun.tokenizer import load_tokenizer
from serverutil import MODEL_ID, WEATHER, make_app, serve_in_thread

pytestmark = pytest.mark.server

HEADER = "X-Mlxrun-Ignored-Fields"
CONTEXT = 1024
BOOK = [{"role": "system", "content": "Book"}, {"role": "user", "content": "What is the best book"}]


@pytest.fixture(scope="module")
def url(tiny_llama):
    with serve_in_thread(make_app(tiny_llama, context=CONTEXT, aliases=("claude-*",))) as base:
        yield base


@pytest.fixture(scope="module")
def strict_url(tiny_llama):
    app = make_app(tiny_llama, context=CONTEXT, aliases=("claude-*",), strict=True)
    with serve_in_thread(app) as base:
        yield base


def _post(base: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(base + path, json=body, timeout=120)


def _ignored(r: httpx.Response) -> list[str]:
    value = r.headers.get(HEADER)
    return value.split(",") if value else []


# ---------------------------------------------------------------- the peers' requests


def test_llama_cpp_multiple_choices_with_id_slot(url, strict_url):
    body = {"max_tokens": 8, "n": 2, "messages": BOOK, "id_slot": 0, "cache_prompt": True}
    r = _post(url, "/v1/chat/completions", {"model": MODEL_ID, **body})
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 2
    for choice in r.json()["choices"]:
        assert choice["message"]["role"] == "assistant"
        # llama.cpp's trained model always runs to max_tokens; random weights sampled at the
        # default temperature may draw the end-of-turn token first.
        assert choice["finish_reason"] in ("length", "stop")
    assert 2 <= r.json()["usage"]["completion_tokens"] <= 2 * 8
    assert _ignored(r) == ["id_slot"]  # cache_prompt is honoured: the prefix cache is on
    r = _post(strict_url, "/v1/chat/completions", {"model": MODEL_ID, **body})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "id_slot" and err["code"] == "unknown_parameter"
    assert HEADER not in r.headers


def test_vllm_extra_fields_allowed(url, strict_url):
    messages = [{"role": "user", "content": "what is 1+1?", "extra_field": "0"}]
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL_ID, messages=messages, temperature=0, seed=0, max_tokens=4
    )
    assert raw.parse().choices[0].message.content is not None
    assert raw.headers[HEADER] == "messages.0.extra_field"
    strict = openai.OpenAI(base_url=strict_url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        strict.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=4)
    assert info.value.body["param"] == "messages[0].extra_field"


def test_mlx_lm_completions_with_repetition_context_size(url, strict_url):
    body = {
        "model": MODEL_ID, "prompt": "Once upon a time", "max_tokens": 10, "temperature": 0.5,
        "top_p": 0.9, "repetition_penalty": 1.1, "repetition_context_size": 20, "seed": 999,
        "stop": "stop sequence",
    }  # fmt: skip
    for base in (url, strict_url):  # every field is one we act on: strict takes it too
        first = _post(base, "/v1/completions", body)
        assert first.status_code == 200, first.text
        assert HEADER not in first.headers
        again = _post(base, "/v1/completions", body)
        assert first.json()["choices"][0]["text"] == again.json()["choices"][0]["text"]


def test_repetition_context_size_sets_the_penalty_window(url):
    """A strong penalty over the last token only, or over the whole output: greedy text differs."""

    def text(window: int) -> str:
        body = {"model": MODEL_ID, "prompt": "the the the", "max_tokens": 24, "temperature": 0,
                "repetition_penalty": 2.0, "repetition_context_size": window}  # fmt: skip
        r = _post(url, "/v1/completions", body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    assert text(1) != text(64)
    r = _post(
        url, "/v1/completions", {"model": MODEL_ID, "prompt": "a", "repetition_context_size": 0}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "repetition_context_size"


def test_n_probs_is_llama_cpps_logprobs(url):
    chat = {"model": MODEL_ID, "messages": BOOK, "max_tokens": 3, "n_probs": 3}
    r = _post(url, "/v1/chat/completions", chat)
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 3 and all(len(t["top_logprobs"]) == 3 for t in content)
    r = _post(
        url, "/v1/completions", {"model": MODEL_ID, "prompt": "a", "max_tokens": 2, "n_probs": 2}
    )
    logprobs = r.json()["choices"][0]["logprobs"]
    assert all(len(top) == 2 for top in logprobs["top_logprobs"])
    assert HEADER not in r.headers
    r = _post(url, "/v1/completions", {"model": MODEL_ID, "prompt": "a", "n_probs": 99})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n_probs"


def test_ignored_fields_are_counted_in_metrics(url):
    body = {"model": MODEL_ID, "prompt": "a", "max_tokens": 1, "frobnicate": 1}
    assert _ignored(_post(url, "/v1/completions", body)) == ["frobnicate"]
    assert _ignored(_post(url, "/v1/completions", body)) == ["frobnicate"]
    metrics = httpx.get(url + "/metrics").text
    line = next(x for x in metrics.splitlines() if 'ignored_fields_total{field="frobnicate"}' in x)
    assert line.endswith(" 2")


def test_ignored_fields_make_a_debug_log_line(url, caplog):
    body = {"model": MODEL_ID, "prompt": "a", "max_tokens": 1, "id_slot": 3}
    with caplog.at_level(logging.DEBUG, logger="mlxrun.server"):
        assert _post(url, "/v1/completions", body).status_code == 200
    assert "POST /v1/completions: ignored fields id_slot" in caplog.text


def test_odd_field_names_are_percent_encoded_in_the_header(url):
    body = {"model": MODEL_ID, "prompt": "a", "max_tokens": 1, "naïve,x": 1, "a b": 2}
    r = _post(url, "/v1/completions", body)
    assert r.status_code == 200 and r.headers[HEADER] == "na%C3%AFve%2Cx,a%20b"


# ---------------------------------------------------------------- the first streamed chunk


def _chunks(base: str, body: dict) -> list[dict]:
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        lines = [x[6:] for x in r.iter_lines() if x.startswith("data: ")]
    return [json.loads(x) for x in lines if x != "[DONE]"]


def test_first_chunk_has_one_shape_with_and_without_tools(url):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]
    body = {"model": MODEL_ID, "messages": BOOK, "max_tokens": 6, "stream": True, "temperature": 0}
    for extra in ({}, {"tools": tools}):
        chunks = _chunks(url, {**body, **extra})
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": None}
        for chunk in chunks[1:]:
            for choice in chunk["choices"]:
                assert "role" not in choice["delta"]
                assert choice["delta"].get("content") != ""  # never an empty content delta


# ---------------------------------------------------------------- item 10: type before use


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("fmt", ["json", 3, ["json_object"]])
def test_response_format_not_an_object_with_grammar_is_a_400(url, strict_url, path, fmt):
    body = {"model": MODEL_ID, "messages": BOOK, "prompt": "a", "max_tokens": 2,
            "grammar": 'root ::= "a"', "response_format": fmt}  # fmt: skip
    body.pop("prompt" if "chat" in path else "messages")
    for base in (url, strict_url):
        r = _post(base, path, body)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "response_format"


# ---------------------------------------------------------------- Claude Code (issue 18 item 8)

# The shape of Claude Code 2.1's first request: a system message after the user turn, adaptive
# thinking, output_config, context_management and a 64000 max_tokens, on /v1/messages?beta=true.
CLAUDE_CODE = {
    "model": "claude-sonnet-4-5",
    "max_tokens": 64000,
    "messages": [
        {"role": "user", "content": [
            {"type": "text", "text": "<system-reminder>Be helpful.</system-reminder>"},
            {"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}},
        ]},
        {"role": "system", "content": "Answer in one word."},
    ],
    "system": [{"type": "text", "text": "You are Claude Code.",
                "cache_control": {"type": "ephemeral"}}],
    "tools": [{"name": "Bash", "description": "Run a command.",
               "input_schema": {"$schema": "http://json-schema.org/draft-07/schema#",
                                "type": "object", "properties": {"command": {"type": "string"}},
                                "required": ["command"], "additionalProperties": False}}],
    "metadata": {"user_id": "user_0"},
    "thinking": {"type": "adaptive"},
    "output_config": {"effort": "high"},
    "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
    "temperature": 0,
    "stream": True,
}  # fmt: skip
HEADERS = {"anthropic-version": "2023-06-01", "anthropic-beta": "claude-code-20250219"}


def _count(base: str, body: dict) -> httpx.Response:
    drop = ("max_tokens", "stream", "temperature", "metadata")  # not count_tokens fields
    body = {k: v for k, v in body.items() if k not in drop}
    return httpx.post(base + "/v1/messages/count_tokens?beta=true", json=body, headers=HEADERS)


@pytest.mark.parametrize("strict", [False, True])
def test_claude_code_first_request(url, strict_url, strict):
    base = strict_url if strict else url
    with httpx.stream("POST", base + "/v1/messages?beta=true", json=CLAUDE_CODE,
                      headers=HEADERS, timeout=120) as r:  # fmt: skip
        assert r.status_code == 200, r.read()
        events = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: ")]
    assert events[0]["type"] == "message_start" and events[-1]["type"] == "message_stop"
    assert all(e["type"] != "error" for e in events)
    assert _ignored(r) == ["context_management"]  # known, with no effect here: reported
    counted = _count(base, CLAUDE_CODE)
    assert counted.status_code == 200, counted.text
    assert counted.json()["input_tokens"] > 0


def test_claude_code_system_message_reaches_the_prompt(url):
    """ChatML renders it as a system turn where it stands: count_tokens agrees with /tokenize."""
    user, system = CLAUDE_CODE["messages"]
    without = _count(url, {**CLAUDE_CODE, "messages": [user]}).json()["input_tokens"]
    with_it = _count(url, CLAUDE_CODE).json()["input_tokens"]
    assert with_it > without
    tools = [{"type": "function", "function": {"name": "Bash", "description": "Run a command.",
                                               "parameters": CLAUDE_CODE["tools"][0]["input_schema"]}}]  # fmt: skip
    texts = "\n\n".join(b["text"] for b in user["content"])
    messages = [{"role": "system", "content": "You are Claude Code."},
                {"role": "user", "content": texts}, system]  # fmt: skip
    # /tokenize renders without tools: compare the two without them.
    bare = {k: v for k, v in CLAUDE_CODE.items() if k != "tools"}
    counted = _count(url, bare).json()["input_tokens"]
    tokenized = _post(url, "/tokenize", {"model": MODEL_ID, "messages": messages}).json()["count"]
    assert counted == tokenized
    assert tools  # the tool rendering itself is test_server_anthropic's business


def test_anthropic_client_with_a_system_message_in_messages(url, strict_url):
    client = anthropic.Anthropic(base_url=url, api_key="x", max_retries=0)
    messages = [{"role": "user", "content": "hi"}, {"role": "system", "content": "Be brief."}]
    extra = {"thinking": {"type": "adaptive"}, "context_management": {"edits": []},
             "temperature": 0}  # fmt: skip
    raw = client.messages.with_raw_response.create(
        model="claude-sonnet-4-5", max_tokens=4, messages=messages, extra_body=extra
    )
    assert raw.parse().type == "message"
    assert raw.headers[HEADER] == "context_management"
    counted = client.messages.count_tokens(model="claude-sonnet-4-5", messages=messages)
    assert counted.input_tokens > 0
    # An unknown field: reported by default, Anthropic's "Extra inputs" error under --strict.
    extra["frobnicate"] = 1
    raw = client.messages.with_raw_response.create(
        model="claude-sonnet-4-5", max_tokens=4, messages=messages, extra_body=extra
    )
    assert raw.headers[HEADER] == "frobnicate,context_management"
    strict = anthropic.Anthropic(base_url=strict_url, api_key="x", max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as info:
        strict.messages.create(model="claude-x", max_tokens=4, messages=messages, extra_body=extra)
    assert info.value.body["error"] == {
        "type": "invalid_request_error",
        "message": "frobnicate: Extra inputs are not permitted",
    }


# ---------------------------------------------------------------- Ollama, FIM, tokenize


def test_ollama_unknown_fields_and_options(url, strict_url):
    body = {"model": MODEL_ID, "stream": False, "frobnicate": True,
            "messages": [{"role": "user", "content": "hi", "images": None, "x_note": "1"}],
            "options": {"num_predict": 2, "num_ctx": 4096, "typo_option": 1}}  # fmt: skip
    r = _post(url, "/api/chat", body)
    assert r.status_code == 200, r.text
    assert _ignored(r) == [
        "frobnicate",
        "messages.0.x_note",
        "options.num_ctx",
        "options.typo_option",
    ]
    r = _post(strict_url, "/api/chat", body)
    assert r.status_code == 400 and r.json() == {"error": 'json: unknown field "frobnicate"'}
    # Known runner options are never refused: they are reported as having no effect.
    known = {"model": MODEL_ID, "prompt": "hi", "stream": False,
             "options": {"num_predict": 2, "num_ctx": 4096}}  # fmt: skip
    r = _post(strict_url, "/api/generate", known)
    assert r.status_code == 200 and _ignored(r) == ["options.num_ctx"]
    # The real client, options it does not type included.
    reply = ollama.Client(host=url).chat(
        model=MODEL_ID, messages=body["messages"][:1], options={"num_predict": 2, "typo_option": 1}
    )
    assert reply.done


def test_llama_vim_infill_body(url, strict_url):
    body = {"input_prefix": "def f(", "input_suffix": "\n", "input_extra": [], "prompt": "",
            "n_predict": 2, "id_slot": 0, "samplers": ["top_k", "top_p", "infill"],
            "cache_prompt": True, "t_max_prompt_ms": 500, "t_max_predict_ms": 1000,
            "n_indent": 4, "top_k": 40, "top_p": 0.99, "stream": False}  # fmt: skip
    for base in (url, strict_url):  # llama.cpp's own options: reported, never refused
        r = _post(base, "/infill", body)
        assert r.status_code == 200, r.text
        assert _ignored(r) == ["id_slot", "samplers", "t_max_prompt_ms", "n_indent"]
    r = _post(strict_url, "/infill", {**body, "frobnicate": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "frobnicate"


def test_mistral_fim_and_tokenize_unknown_fields(url, strict_url):
    fim = {
        "model": MODEL_ID,
        "prompt": "def f(",
        "suffix": "\n",
        "max_tokens": 2,
        "frobnicate": 1,
        "repetition_context_size": 5,
    }  # honoured: not reported
    assert _ignored(_post(url, "/v1/fim/completions", fim)) == ["frobnicate"]
    r = _post(strict_url, "/v1/fim/completions", fim)
    assert r.status_code == 400 and r.json()["error"]["param"] == "frobnicate"
    # llama.cpp's /tokenize names: content, add_special and with_pieces are all honoured.
    body = {"content": "hello world", "add_special": False, "with_pieces": True, "id_slot": 0}
    r = _post(url, "/tokenize", body)
    plain = _post(url, "/tokenize", {"prompt": "hello world", "add_special_tokens": False})
    assert r.status_code == 200 and [t["id"] for t in r.json()["tokens"]] == plain.json()["tokens"]
    assert "".join(t["piece"] for t in r.json()["tokens"]) == "hello world"
    assert _ignored(r) == ["id_slot"]
    r = _post(strict_url, "/tokenize", body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "id_slot"


# ---------------------------------------------------------------- chat_template_kwargs

# Qwen3's switch: with enable_thinking false the generation prompt closes an empty think block.
QWEN3_SWITCH = """\
{%- for message in messages %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}
{%- endif %}
{%- endif %}
"""


def test_chat_template_kwargs_reach_the_template(tiny_llama, tmp_path):
    model = tmp_path / "qwen3ish"
    shutil.copytree(tiny_llama, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(
        json.dumps({**config, "chat_template": QWEN3_SWITCH})
    )
    with serve_in_thread(make_app(model)) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)

        def prompt_tokens(**extra) -> tuple[int, str | None]:
            raw = client.chat.completions.with_raw_response.create(
                model=MODEL_ID, messages=BOOK[1:], max_tokens=1, extra_body=extra
            )
            return raw.parse().usage.prompt_tokens, raw.headers.get(HEADER)

        on, ignored_on = prompt_tokens()
        off, ignored_off = prompt_tokens(chat_template_kwargs={"enable_thinking": False})
        closed = len(
            load_tokenizer(model).encode("<think>\n\n</think>\n\n", add_special_tokens=False)
        )
        assert off == on + closed and ignored_on is None and ignored_off is None
