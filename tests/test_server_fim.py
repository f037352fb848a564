"""Fill-in-the-middle on the three dialects editors speak, against a real server (uvicorn on a
loopback port, the real engine, tiny random-weight models): /v1/completions with `suffix` through
the official `openai` client, /v1/fim/completions (Mistral style) and /infill (llama.cpp style)
through httpx; stale-request cancellation and interactive priority observed in the engine."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from mlxrun.server.fim_groups import FimGroups, same_lineage
from mlxrun.server.routes.fim import infill_prompt
from mlxrun.tokenizer import load_tokenizer
from serverutil import MODEL_ID, make_app, serve_in_thread

PREFIX, SUFFIX = "def add(a, b):\n    ret", "\n\nprint(add(1, 2))\n"
SNIPPET = "\n\n--- snippet ---\n\n"  # llama.cpp's separator when the vocab has no <file_sep>
LONG = 400  # tokens for a request that must still be running when its successor arrives


@pytest.fixture(scope="module")
def served(tiny_llama):
    app = make_app(tiny_llama)
    with serve_in_thread(app) as url:
        yield app, url


@pytest.fixture(scope="module")
def url(served):
    return served[1]


@pytest.fixture(scope="module")
def engine(served):
    return served[0].state.server.engine


@pytest.fixture(scope="module")
def http(url):
    with httpx.Client(base_url=url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def tok(tiny_llama):
    return load_tokenizer(tiny_llama)


def _mistral(**kw) -> dict:
    return {"model": MODEL_ID, "prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 8,
            "temperature": 0, **kw}  # fmt: skip


def _infill(**kw) -> dict:
    # The cursor splits the last line: llama.vim sends it as `prompt`, after the prefix.
    return {"input_prefix": PREFIX[:15], "prompt": PREFIX[15:], "input_suffix": SUFFIX,
            "n_predict": 8, "temperature": 0, **kw}  # fmt: skip


def _events(lines: Iterator[str]) -> Iterator[str]:
    for line in lines:
        if line.startswith("data: "):
            yield line[len("data: ") :]


def _error(r: httpx.Response, param: str) -> None:
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text


# ---------------------------------------------------------------- the three dialects


def test_one_prompt_on_all_three_dialects(client, http, tok):
    want_ids = tok.build_fim_prompt(PREFIX, SUFFIX)
    r = client.completions.create(
        model=MODEL_ID, prompt=PREFIX, suffix=SUFFIX, max_tokens=8, temperature=0
    )
    text = r.choices[0].text
    assert text and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(want_ids) and r.usage.completion_tokens == 8

    m = http.post("/v1/fim/completions", json=_mistral()).json()
    assert m["object"] == "chat.completion" and m["model"] == MODEL_ID and m["id"]
    (choice,) = m["choices"]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"] == text
    assert choice["finish_reason"] == "length"
    assert m["usage"]["prompt_tokens"] == len(want_ids) and m["usage"]["completion_tokens"] == 8

    i = http.post("/infill", json=_infill()).json()
    assert i["content"] == text and i["stop"] is True and i["stop_type"] == "limit"
    assert i["tokens_evaluated"] == len(want_ids) and i["tokens_predicted"] == 8
    assert i["prompt"] == tok.decode(want_ids)  # the prompt exactly as build_fim_prompt makes it
    assert i["model"] == MODEL_ID and i["generation_settings"]["n_predict"] == 8
    assert i["timings"]["predicted_n"] == 8 and i["timings"]["prompt_n"] >= 0


def test_streams_on_all_three_dialects(client, http):
    text = http.post("/v1/fim/completions", json=_mistral()).json()["choices"][0]["message"]

    chunks = list(
        client.completions.create(
            model=MODEL_ID, prompt=PREFIX, suffix=SUFFIX, max_tokens=8, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == text["content"]
    assert chunks[-1].choices[0].finish_reason == "length"

    with http.stream("POST", "/v1/fim/completions", json=_mistral(stream=True)) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = list(_events(r.iter_lines()))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == text["content"]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-2:] == [None, "length"]
    assert chunks[-1]["usage"]["completion_tokens"] == 8

    with http.stream("POST", "/infill", json=_infill(stream=True)) as r:
        events = list(_events(r.iter_lines()))
    assert "[DONE]" not in events  # llama.cpp's own endpoints send none
    chunks = [json.loads(e) for e in events]
    assert [c["stop"] for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert "".join(c["content"] for c in chunks) == text["content"]
    assert chunks[-1]["content"] == "" and chunks[-1]["stop_type"] == "limit"
    assert chunks[-1]["tokens_predicted"] == 8


def test_infill_extra_context_without_file_separator(http, tok):
    extra = [{"filename": "util.py", "text": "def helper():\n    return 1\n", "time": 3}]
    r = http.post("/infill", json=_infill(input_extra=extra)).json()
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    want = enc(SNIPPET) + enc(extra[0]["text"]) + tok.build_fim_prompt(PREFIX, SUFFIX)
    assert r["tokens_evaluated"] == len(want)
    assert (
        r["prompt"]
        == tok.decode(want)
        == (
            f"{SNIPPET}{extra[0]['text']}<|fim_prefix|>{PREFIX}<|fim_suffix|>{SUFFIX}<|fim_middle|>"
        )
    )


def test_infill_extra_context_is_cut_to_fit(http, tok):
    fim = tok.build_fim_prompt(PREFIX, SUFFIX)
    huge = [{"filename": "big.py", "text": "x = 1\n" * 400}]  # > the 512-token context
    r = http.post("/infill", json=_infill(input_extra=huge, n_predict=20)).json()
    assert r["tokens_evaluated"] == 512 - 20  # the oldest extra tokens went
    assert r["prompt"].endswith(tok.decode(fim)) and r["tokens_predicted"] == 20


def test_repo_level_layout_with_file_separator(tiny_llama, tmp_path):
    ref = AutoTokenizer.from_pretrained(str(tiny_llama))
    ref.add_tokens(["<|repo_name|>", "<|file_sep|>"], special_tokens=True)
    ref.save_pretrained(str(tmp_path))
    tok = load_tokenizer(tmp_path)
    assert tok.fim_tokens.file_sep == "<|file_sep|>"
    extra = [("a.py", "x = 1\n"), ("b.py", "y = 2\n")]
    ids = infill_prompt(tok, PREFIX, SUFFIX, extra, budget=10_000)
    assert tok.decode(ids) == (
        "<|repo_name|>myproject\n<|file_sep|>a.py\nx = 1\n<|file_sep|>b.py\ny = 2\n"
        f"<|file_sep|>filename\n<|fim_prefix|>{PREFIX}<|fim_suffix|>{SUFFIX}<|fim_middle|>"
    )
    fim = tok.build_fim_prompt(PREFIX, SUFFIX)
    assert ids[-len(fim) :] == fim
    # Over budget: the extra context loses its oldest tokens, the FIM part nothing.
    assert infill_prompt(tok, PREFIX, SUFFIX, extra, budget=len(fim) + 5) == ids[-len(fim) - 5 :]
    assert infill_prompt(tok, PREFIX, SUFFIX, extra, budget=len(fim)) == fim


def test_infill_warmup_and_response_fields(http):
    # llama.vim's background request: evaluate the extra context, generate nothing.
    warm = {"input_prefix": "", "input_suffix": "", "prompt": "", "n_predict": 0,
            "input_extra": [{"filename": "a.py", "text": "import os\n"}]}  # fmt: skip
    r = http.post("/infill", json=warm).json()
    assert r["content"] == "" and r["tokens_predicted"] == 0 and r["stop"] is True
    assert http.post("/infill", json={**warm, "response_fields": [""]}).json() == {}
    fields = ["content", "timings/prompt_n", "tokens_cached", "no/such"]
    r = http.post("/infill", json=_infill(response_fields=fields)).json()
    assert set(r) == {"content", "timings/prompt_n", "tokens_cached"} and r["content"]


# ---------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def no_fim_url(checkpoint_factory):
    path = checkpoint_factory("llama", tokenizer="spm")  # a SentencePiece vocab: no FIM tokens
    with serve_in_thread(make_app(path)) as url:
        yield url


def test_model_without_fim_tokens_is_a_400_on_all_three(no_fim_url):
    client = openai.OpenAI(base_url=no_fim_url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL_ID, prompt="a", suffix="b", max_tokens=2)
    assert info.value.body["param"] == "suffix"
    _error(httpx.post(no_fim_url + "/v1/fim/completions", json=_mistral()), "suffix")
    _error(httpx.post(no_fim_url + "/infill", json=_infill()), "input_suffix")
    # The same server completes plain prompts.
    assert client.completions.create(model=MODEL_ID, prompt="a", max_tokens=2).choices[0].text


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/fim/completions", {"model": MODEL_ID}, "prompt"),
        ("/v1/fim/completions", {"prompt": "x"}, "model"),
        ("/v1/fim/completions", _mistral(prompt=5), "prompt"),
        ("/v1/fim/completions", _mistral(suffix=["x"]), "suffix"),
        ("/v1/fim/completions", _mistral(user=5), "user"),
        ("/v1/fim/completions", _mistral(min_tokens=3), "min_tokens"),
        ("/v1/fim/completions", _mistral(temperature="hot"), "temperature"),
        ("/v1/fim/completions", _mistral(random_seed="x"), "random_seed"),
        ("/v1/fim/completions", _mistral(max_tokens=0), "max_tokens"),
        ("/v1/fim/completions", _mistral(max_tokens=None, max_completion_tokens=-1),
         "max_completion_tokens"),
        ("/v1/fim/completions", _mistral(stop=[1]), "stop"),
        ("/v1/fim/completions", _mistral(stream="yes"), "stream"),
        ("/infill", _infill(input_prefix=3), "input_prefix"),
        ("/infill", _infill(input_extra="x"), "input_extra"),
        ("/infill", _infill(input_extra=[{"text": 5}]), "input_extra[0].text"),
        ("/infill", _infill(input_extra=["x"]), "input_extra[0]"),
        ("/infill", _infill(n_predict="8"), "n_predict"),
        ("/infill", _infill(repeat_penalty=-1), "repeat_penalty"),
        ("/infill", _infill(top_k="x"), "top_k"),
        ("/infill", _infill(grammar="root ::= [a-z]+"), "grammar"),
        ("/infill", _infill(logit_bias=[[1]]), "logit_bias"),
        ("/infill", _infill(response_fields=[1]), "response_fields"),
        ("/infill", _infill(model=3), "model"),
    ],
)  # fmt: skip
def test_bad_bodies_name_the_field(http, path, body, param):
    _error(http.post(path, json=body), param)


def test_body_not_an_object(http):
    for path in ("/v1/fim/completions", "/infill"):
        r = http.post(path, content=b"[1, 2]", headers={"content-type": "application/json"})
        assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]


# ---------------------------------------------------------------- stale requests and priority


def _first_content(events: Iterator[str], key) -> None:
    """Read events until one carries text: the request is generating."""
    for e in events:
        if e != "[DONE]" and key(json.loads(e)):
            return
    raise AssertionError("the stream ended before any text")


def test_group_header_cancels_the_stale_request_across_dialects(http, engine, served):
    before = engine.stats()["group_cancellations"]
    headers = {"X-Mlxrun-Group": "editor-1"}
    a = _mistral(max_tokens=LONG, stream=True, prompt="import os\n")
    with http.stream("POST", "/v1/fim/completions", json=a, headers=headers) as r:
        events = _events(r.iter_lines())
        _first_content(events, lambda c: c["choices"][0]["delta"]["content"])
        b = http.post("/infill", json=_infill(n_predict=2), headers=headers).json()
        rest = [e for e in events]
    assert b["content"] and b["stop_type"] == "limit"  # the newcomer runs normally
    assert rest[-1] == "[DONE]"
    last = json.loads(rest[-2])
    assert last["choices"][0]["finish_reason"] == "error"  # Mistral's word for our "abort"
    assert last["usage"]["completion_tokens"] < LONG
    assert engine.stats()["group_cancellations"] == before + 1


def test_prefix_lineage_cancels_without_a_header(client, engine, served):
    before = engine.stats()["group_cancellations"]
    kw = {"model": MODEL_ID, "suffix": SUFFIX, "temperature": 0}
    stream = client.completions.create(prompt="def f(a, b):\n    ret", max_tokens=LONG,
                                       stream=True, **kw)  # fmt: skip
    chunks = iter(stream)
    assert next(c for c in chunks if c.choices[0].text)  # generating
    typed_on = client.completions.create(prompt="def f(a, b):\n    retu", max_tokens=2, **kw)
    rest = list(chunks)
    assert typed_on.choices[0].finish_reason == "length"
    assert rest[-1].choices[0].finish_reason == "abort"
    assert engine.stats()["group_cancellations"] == before + 1
    assert served[0].state.fim_groups.in_flight() == 0  # every response released its entry


def test_infill_lineage_cancel_ends_the_stream_cleanly(http, engine):
    before = engine.stats()["group_cancellations"]
    a = _infill(input_prefix="x = 1\nfor i in ra", prompt="", n_predict=LONG, stream=True,
                ignore_eos=True)  # fmt: skip
    with http.stream("POST", "/infill", json=a) as r:
        events = _events(r.iter_lines())
        _first_content(events, lambda c: c["content"])
        b = http.post("/infill", json={**a, "input_prefix": "x = 1\nfor i in ran", "n_predict": 2,
                                       "stream": False}).json()  # fmt: skip
        rest = [json.loads(e) for e in events]
    assert b["stop_type"] == "limit" and b["tokens_predicted"] == 2
    final = rest[-1]
    assert final["stop"] is True and final["stop_type"] == "none"
    assert final["tokens_predicted"] < LONG
    assert engine.stats()["group_cancellations"] == before + 1


def test_different_api_keys_never_cancel_each_other(http, engine):
    before = engine.stats()["group_cancellations"]
    group = {"X-Mlxrun-Group": "shared-name"}
    a = _mistral(max_tokens=150, stream=True, prompt="import os\n")
    with http.stream("POST", "/v1/fim/completions", json=a,
                     headers={**group, "Authorization": "Bearer key-1"}) as r:  # fmt: skip
        events = _events(r.iter_lines())
        _first_content(events, lambda c: c["choices"][0]["delta"]["content"])
        # Same group header and the same prompt lineage, but another client.
        b = http.post("/v1/fim/completions", json=_mistral(prompt="import os\n", max_tokens=2),
                      headers={**group, "Authorization": "Bearer key-2"})  # fmt: skip
        rest = [e for e in events]
    assert b.status_code == 200
    last = json.loads(rest[-2])
    assert last["choices"][0]["finish_reason"] == "length"
    assert last["usage"]["completion_tokens"] == 150
    assert engine.stats()["group_cancellations"] == before


def test_fim_runs_at_interactive_priority(tiny_llama):
    """One decode slot: a FIM request queued after a plain one still runs first."""
    app = make_app(tiny_llama, max_running=1)
    engine = app.state.server.engine
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=120) as http:
        done: dict[str, float] = {}

        def post(name: str, path: str, body: dict) -> None:
            assert http.post(path, json=body).status_code == 200
            done[name] = time.monotonic()

        def queued(n: int) -> None:
            deadline = time.monotonic() + 30
            while engine.stats()["waiting"] < n:
                assert time.monotonic() < deadline, "the request never queued"
                time.sleep(0.005)

        plain = {"model": MODEL_ID, "prompt": "hello", "max_tokens": 4}
        long = {**plain, "max_tokens": LONG, "temperature": 0, "stream": True}
        threads = [
            threading.Thread(target=post, args=("plain", "/v1/completions", plain)),
            threading.Thread(target=post, args=("fim", "/v1/fim/completions", _mistral())),
        ]
        with http.stream("POST", "/v1/completions", json=long) as r:
            lines = r.iter_lines()
            next(_events(lines))  # the long request holds the only slot
            for n, t in enumerate(threads, 1):
                t.start()
                queued(n)  # the plain request arrives first
            list(lines)
        for t in threads:
            t.join(timeout=120)
    assert done["fim"] < done["plain"]


# ---------------------------------------------------------------- the group rule itself


def test_same_lineage():
    base = "def f(a, b):\n    ret"
    assert same_lineage(base, base + "u")  # typing on
    assert same_lineage(base + "urn", base)  # deleting
    assert same_lineage(base, "def f(a, b):\n    rex")  # retyping the partial word
    assert same_lineage(base + "urn a\n", base + "urn a\n    ")  # a new line
    assert not same_lineage(base, "def g(a, b):\n    ret")  # edited further back
    assert not same_lineage("abc", "xyz") and same_lineage("", "")


def test_groups_registry():
    groups = FimGroups()
    a = groups.claim("k1", None, "x = 1\nfor i", "S")
    assert groups.claim("k1", None, "x = 1\nfor in", "S").group == a.group
    assert groups.claim("k1", None, "x = 1\nfor i", "other suffix").group != a.group
    assert groups.claim("k2", None, "x = 1\nfor i", "S").group != a.group
    h1, h2 = groups.claim("k1", "ed", "", ""), groups.claim("k1", "ed", "zzz", "S")
    assert h1.group == h2.group != groups.claim("k2", "ed", "", "").group
    assert groups.in_flight() == 4  # header groups need no bookkeeping
    a.release()
    a.release()  # idempotent
    assert groups.in_flight() == 3
