"""One server, several clients: named keys, ownership of what a request creates, model names that
never reach the filesystem or the network, and per-key limits. Real clients against uvicorn on
loopback with two named keys."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time

import anthropic
import httpx
import ollama
import openai
import pytest

from serverutil import MODEL_ID, make_app, serve_in_thread

pytestmark = pytest.mark.server

ALICE, BOB = "alice-secret-key-1", "bob-secret-key-2"
KEYS = (("alice", ALICE), ("bob", BOB))
USER = [{"role": "user", "content": "Say hi"}]


@pytest.fixture(scope="module")
def served(tiny_llama):
    app = make_app(tiny_llama, api_keys=KEYS)
    with serve_in_thread(app) as url:
        yield app, url


@pytest.fixture(scope="module")
def url(served):
    return served[1]


def _oa(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


def _an(url: str, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key=key, max_retries=0)


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_named_keys_are_logged_and_counted_by_name_never_by_key(url):
    log = logging.getLogger("mlxrun.access")
    handler, level = _Lines(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        _oa(url, ALICE).chat.completions.create(model=MODEL_ID, messages=USER, max_tokens=2)
        _an(url, BOB).messages.create(model=MODEL_ID, messages=USER, max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            _oa(url, "not-a-key").models.list()
        with pytest.raises(anthropic.AuthenticationError):
            _an(url, ALICE + "x").messages.create(model=MODEL_ID, messages=USER, max_tokens=2)
        # A line is written once the app returns, which may be just after the client has its
        # response: give the last one a moment.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(handler.lines) < 4:
            time.sleep(0.05)
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    chat = [line for line in handler.lines if "/v1/chat/completions 200" in line]
    messages = [line for line in handler.lines if "/v1/messages 200" in line]
    assert chat and " key=alice " in chat[-1], handler.lines
    assert messages and " key=bob " in messages[-1], handler.lines
    metrics = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {ALICE}"}).text
    assert 'mlxrun_key_requests_total{key="alice",status="200"}' in metrics
    assert 'mlxrun_key_requests_total{key="bob",status="200"}' in metrics
    everything = "\n".join(handler.lines) + metrics
    assert ALICE not in everything and BOB not in everything and "not-a-key" not in everything


def test_a_fim_group_belongs_to_the_key_that_made_it(served):
    app, url = served
    engine = app.state.server.engine
    group = {"X-Mlxrun-Group": "editor-1"}
    body = {"model": MODEL_ID, "prompt": "import os\n", "suffix": "\n", "temperature": 0}

    def run_against(second_key: str) -> int:
        before = engine.stats()["group_cancellations"]
        long = {**body, "max_tokens": 150, "stream": True}
        with httpx.stream("POST", url + "/v1/fim/completions", json=long, timeout=120,
                          headers={**group, "Authorization": f"Bearer {ALICE}"}) as r:  # fmt: skip
            lines = (ln for ln in r.iter_lines() if ln.startswith("data: "))
            next(lines)  # alice's request is generating
            second = httpx.post(url + "/v1/fim/completions", json={**body, "max_tokens": 2},
                                headers={**group, "Authorization": f"Bearer {second_key}"},
                                timeout=120)  # fmt: skip
            assert second.status_code == 200, second.text
            frames = [json.loads(ln[6:]) for ln in lines if ln != "data: [DONE]"]
        return engine.stats()["group_cancellations"] - before, frames

    cancelled, frames = run_against(BOB)  # the same group name, another key: no effect
    assert cancelled == 0
    assert frames[-1]["usage"]["completion_tokens"] == 150
    cancelled, frames = run_against(ALICE)  # her own newer request supersedes it
    assert cancelled == 1
    assert frames[-1]["usage"]["completion_tokens"] < 150


def test_a_cache_control_pin_belongs_to_the_key_that_made_it(url):
    document = "a private contract clause " * 30
    marked = [{"role": "user", "content": [
        {"type": "text", "text": document, "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": "Summarize it."}]}]  # fmt: skip
    alice, bob = _an(url, ALICE), _an(url, BOB)
    first = alice.messages.create(model=MODEL_ID, messages=marked, max_tokens=1)
    assert first.usage.cache_creation_input_tokens > 30
    again = alice.messages.create(model=MODEL_ID, messages=marked, max_tokens=1)
    assert again.usage.cache_read_input_tokens >= first.usage.cache_creation_input_tokens
    # Bob sends the same prompt: he neither reads Alice's pinned KV nor learns it exists.
    # (At most the chat template's opening, cached from his own earlier request, is a hit.)
    other = bob.messages.create(model=MODEL_ID, messages=marked, max_tokens=1)
    assert other.usage.cache_read_input_tokens < 30
    marked_total = other.usage.cache_read_input_tokens + other.usage.cache_creation_input_tokens
    assert marked_total == first.usage.cache_creation_input_tokens  # he computed it himself


# ---------------------------------------------------------------- model names


@pytest.fixture
def no_lookups(monkeypatch, tiny_llama):
    """Fails the test if anything tries to resolve, load, download or open a named model;
    returns the list of audit events that touched a requested name."""
    import huggingface_hub

    from mlxrun import hub, loader, store

    def forbidden(*args, **kwargs):
        raise AssertionError(f"a request reached the model loader: {args} {kwargs}")

    for module, name in [(huggingface_hub, "snapshot_download"), (huggingface_hub, "hf_hub_download"),
                         (hub, "resolve_source"), (store, "resolve_model"), (loader, "load"),
                         (hub, "read_config")]:  # fmt: skip
        monkeypatch.setattr(module, name, forbidden)
    touched: list[tuple] = []
    watching = threading.Event()
    watching.set()

    def audit(event: str, args: tuple) -> None:
        if watching.is_set() and event in _FS_AND_NET_EVENTS:
            text = repr(args)
            if any(n in text for n in _NEEDLES):
                touched.append((event, args))

    sys.addaudithook(audit)  # hooks cannot be removed: it goes quiet after the test
    yield touched
    watching.clear()


_FS_AND_NET_EVENTS = {"open", "os.listdir", "os.scandir", "glob.glob", "os.chdir",
                      "socket.getaddrinfo", "socket.connect", "urllib.Request", "shutil.rmtree",
                      "os.remove", "os.rmdir"}  # fmt: skip
HOSTILE = ["../" + MODEL_ID, "../../etc/passwd", "/etc", "/etc/passwd", "meta-llama/Llama-3.2-1B",
           "https://evil.example/model.safetensors", "..", "~/.ssh/id_rsa"]  # fmt: skip
_NEEDLES = ["/etc", "passwd", "meta-llama", "evil.example", "id_rsa", "../" + MODEL_ID]


def test_hostile_model_names_are_404s_that_touch_nothing(url, no_lookups, tiny_llama):
    oa, an = _oa(url, ALICE), _an(url, ALICE)
    ol = ollama.Client(host=url, headers={"Authorization": f"Bearer {ALICE}"})
    for name in [*HOSTILE, str(tiny_llama)]:
        with pytest.raises(openai.NotFoundError) as e:
            oa.chat.completions.create(model=name, messages=USER, max_tokens=1)
        assert "This server serves: tiny" in e.value.body["message"]
        with pytest.raises(openai.NotFoundError):
            oa.completions.create(model=name, prompt="x", max_tokens=1)
        with pytest.raises(anthropic.NotFoundError) as a:
            an.messages.create(model=name, messages=USER, max_tokens=1)
        assert a.value.body["error"]["type"] == "not_found_error"
        calls = [(ol.chat, {"model": name, "messages": USER}), (ol.show, {"model": name}),
                 (ol.pull, {"model": name}), (ol.delete, {"model": name})]  # fmt: skip
        for call, kwargs in calls:
            with pytest.raises(ollama.ResponseError) as o:
                call(**kwargs)
            assert o.value.status_code == 404 and "this server serves: tiny:latest" in o.value.error
    r = httpx.get(
        url + "/v1/models/..%2F..%2Fetc%2Fpasswd", headers={"Authorization": f"Bearer {ALICE}"}
    )
    assert r.status_code == 404 and "tiny" in r.json()["error"]["message"]
    assert no_lookups == []  # nothing was opened, listed or fetched for those names


# ---------------------------------------------------------------- per-key limits


def test_one_key_over_its_limit_gets_429s_while_another_is_served(tiny_llama):
    app = make_app(tiny_llama, api_keys=KEYS, max_concurrent_per_key=1, max_queued_per_key=0)
    eos = {str(i): -100 for i in app.state.server.tokenizer.eos_token_ids}
    with serve_in_thread(app) as url:
        long = {"model": MODEL_ID, "messages": USER, "max_tokens": 450, "stream": True,
                "logit_bias": eos}  # fmt: skip
        alice = {"Authorization": f"Bearer {ALICE}"}
        with httpx.stream("POST", url + "/v1/chat/completions", json=long, headers=alice,
                          timeout=120) as held:  # fmt: skip
            lines = (ln for ln in held.iter_lines() if ln.startswith("data: "))
            next(lines)  # alice holds her one slot
            with pytest.raises(openai.RateLimitError) as e:
                _oa(url, ALICE).chat.completions.create(model=MODEL_ID, messages=USER, max_tokens=1)
            assert int(e.value.response.headers["retry-after"]) >= 1
            assert e.value.body["type"] == "rate_limit_error"
            with pytest.raises(anthropic.RateLimitError) as a:
                _an(url, ALICE).messages.create(model=MODEL_ID, messages=USER, max_tokens=1)
            assert (
                a.value.status_code == 429 and a.value.body["error"]["type"] == "rate_limit_error"
            )
            assert "retry-after" in a.value.response.headers
            o = httpx.post(url + "/api/chat", headers=alice, timeout=60,
                           json={"model": MODEL_ID, "messages": USER, "stream": False})  # fmt: skip
            assert (
                o.status_code == 429 and set(o.json()) == {"error"} and "Retry-After" in o.headers
            )
            # Bob is not starved by Alice's load.
            ok = _oa(url, BOB).chat.completions.create(model=MODEL_ID, messages=USER, max_tokens=2)
            assert ok.choices[0].message is not None
        # Her slot is free again once her stream is done.
        done = _oa(url, ALICE).chat.completions.create(model=MODEL_ID, messages=USER, max_tokens=1)
        assert done.usage.completion_tokens == 1


def test_a_stored_response_belongs_to_the_key_that_made_it(url):
    """Bob gets Alice's response id only as a 404: not by GET, input_items, DELETE, cancel or as
    previous_response_id; Alice still has it afterwards."""
    alice, bob = _oa(url, ALICE), _oa(url, BOB)
    made = alice.responses.create(model=MODEL_ID, input="Say hi", max_output_tokens=2)
    for attempt in (
        lambda: bob.responses.retrieve(made.id),
        lambda: bob.responses.input_items.list(made.id),
        lambda: bob.responses.delete(made.id),
        lambda: bob.responses.cancel(made.id),
        lambda: bob.responses.create(
            model=MODEL_ID, input="more", previous_response_id=made.id, max_output_tokens=2
        ),
    ):
        with pytest.raises(openai.NotFoundError) as caught:
            attempt()
        assert "Say hi" not in str(caught.value.body)
    assert alice.responses.retrieve(made.id).id == made.id
    assert [i.type for i in alice.responses.input_items.list(made.id).data] == ["message"]
    follow = alice.responses.create(
        model=MODEL_ID, input="more", previous_response_id=made.id, max_output_tokens=2
    )
    assert follow.previous_response_id == made.id
