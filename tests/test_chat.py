"""ChatSession on tiny random-weight models: turns run on the engine, whose prefix cache keeps
the conversation's KV across turns; overflow handling, interruption (an engine abort), /set
parsing and transcripts."""

from __future__ import annotations

import json
import shutil
import signal

import pytest

from mlxrun.chat import ChatSession, TurnStats
from mlxrun.errors import ContextLengthExceededError, InvalidRequestError
from mlxrun.generate import generate_stream
from mlxrun.sampling import SamplingParams

pytestmark = pytest.mark.model

MESSAGES = [
    "def add(a, b): return a + b",
    "class Stack: pass",
    "for i in range(10): print(i)",
    "import os, sys",
    "while True: break",
]
GREEDY = SamplingParams(temperature=0, max_tokens=8)


@pytest.fixture(scope="module", params=["bpe", "spm"])
def lm(request, checkpoint_factory):
    """bpe: ChatML template; spm: Llama-2 [INST] template."""
    from mlxrun.loader import load

    return load(str(checkpoint_factory("llama", tokenizer=request.param)))


@pytest.fixture(scope="module")
def bpe_lm(checkpoint_factory):
    from mlxrun.loader import load

    return load(str(checkpoint_factory("llama")))


_OPEN: list[ChatSession] = []


@pytest.fixture(autouse=True)
def _close_sessions():
    yield
    while _OPEN:
        _OPEN.pop().close()  # each session's own engine thread stops


def session(lm, params=GREEDY, **kw) -> ChatSession:
    model, tokenizer, info = lm
    kw.setdefault("context_length", info.context_length)
    chat = ChatSession(model, tokenizer, params, **kw)
    _OPEN.append(chat)
    return chat


def test_each_turn_prefills_only_its_new_tokens(lm):
    tokenizer = lm[1]
    chat = session(lm, system="You write Python.")
    for i, text in enumerate(MESSAGES):
        reply = "".join(chat.send(text))
        turn = chat.last_turn
        assert isinstance(turn, TurnStats)
        assert chat.messages[-2:] == [
            {"role": "user", "content": text},
            {"role": "assistant", "content": reply},
        ]
        if i == 0:
            assert turn.prefilled_tokens == turn.prompt_tokens
            continue
        prev = chat.turns[-2]
        full = [{"role": "system", "content": chat.system}, *chat.messages]
        history = tokenizer.render_chat(full[:-2], add_generation_prompt=False)
        prompt = tokenizer.render_chat(full[:-1], add_generation_prompt=True)
        assert prompt.startswith(history)
        new_turn = tokenizer.encode(prompt[len(history) :], add_special_tokens=False)
        # Everything the last turn fed and generated is reused, but for at most its final token
        # (a reply cut by max_tokens never fed its last token to the model).
        assert turn.reused_tokens >= prev.prompt_tokens + prev.generation_tokens - 1
        # What is left: the new turn as the template writes it, the closing of the last reply
        # (e.g. "<|im_end|>\n"), and that reply's last token when max_tokens cut it.
        assert turn.prefilled_tokens <= len(new_turn) + 4
    assert chat.last_turn.prefilled_tokens * 4 < chat.last_turn.prompt_tokens
    stats = chat.engine_stats()
    assert stats["cache_memory_tokens"] >= chat.last_turn.prompt_tokens
    assert stats["cache_memory_bytes"] > 0 and stats["cache_hits"] == len(MESSAGES) - 1


def test_cached_turn_matches_a_fresh_generation(lm):
    """Reusing the cache must not change what the model says: turn 3 with the kept cache equals
    generating from the same ids with an empty cache."""
    model, tokenizer, _ = lm
    chat = session(lm, params=GREEDY.replace(max_tokens=12))
    for text in MESSAGES[:2]:
        "".join(chat.send(text))
    ids = chat.prompt_ids(MESSAGES[2])
    reply = "".join(chat.send(MESSAGES[2]))
    assert chat.last_turn.prompt_tokens == len(ids)
    assert chat.last_turn.reused_tokens > len(ids) // 2
    fresh = "".join(c.text for c in generate_stream(model, tokenizer, ids, chat.params))
    assert reply == fresh


def test_closing_early_keeps_the_partial_reply(bpe_lm):
    chat = session(bpe_lm, params=GREEDY.replace(max_tokens=200))
    stream = chat.send(MESSAGES[0])
    shown = [next(stream) for _ in range(3)]
    stream.close()
    assert chat.messages == [
        {"role": "user", "content": MESSAGES[0]},
        {"role": "assistant", "content": "".join(shown)},
    ]
    turn = chat.last_turn
    assert turn.finish_reason == "interrupted"
    assert 3 <= turn.generation_tokens < 200
    "".join(chat.send(MESSAGES[1]))
    nxt = chat.last_turn
    assert nxt.reused_tokens >= turn.prompt_tokens + turn.generation_tokens - 1


def test_keyboard_interrupt_inside_generation(bpe_lm):
    """A real SIGINT lands wherever generation is (mid forward pass, mid bookkeeping): the turn
    keeps its partial reply, the cache stays consistent, and the next turn is still right."""
    model, tokenizer, _ = bpe_lm
    chat = session(bpe_lm, params=GREEDY.replace(max_tokens=1500))
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        stream = chat.send(MESSAGES[0])
        signal.signal(signal.SIGALRM, lambda *_: signal.raise_signal(signal.SIGINT))
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        with pytest.raises(KeyboardInterrupt):
            for _ in stream:
                pass
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, old)
    assert chat.last_turn.finish_reason == "interrupted"
    assert chat.last_turn.generation_tokens < 1500
    assert [m["role"] for m in chat.messages] == ["user", "assistant"]
    stats = chat.engine_stats()  # the request was aborted and has left the engine
    assert stats["aborted"] == 1 and stats["running"] == 0 and stats["waiting"] == 0
    chat.set_param("max_tokens", "12")
    ids = chat.prompt_ids(MESSAGES[1])
    reply = "".join(chat.send(MESSAGES[1]))
    assert chat.last_turn.reused_tokens > 0
    fresh = "".join(c.text for c in generate_stream(model, tokenizer, ids, chat.params))
    assert reply == fresh


def _fill(chat: ChatSession) -> str:
    """Chat until the next message overflows; returns that message."""
    for i in range(50):
        text = f"{MESSAGES[i % len(MESSAGES)]} # {i}"
        try:
            "".join(chat.send(text))
        except ContextLengthExceededError:
            return text
    raise AssertionError("the context never filled")


def test_overflow_raises_then_drop_oldest_turns(bpe_lm):
    chat = session(bpe_lm, context_length=160, system="Be brief.")
    text = _fill(chat)
    before = list(chat.messages)
    with pytest.raises(ContextLengthExceededError) as err:
        chat.send(text)
    assert err.value.prompt_tokens + GREEDY.max_tokens > 160
    assert chat.messages == before  # nothing changed
    dropped = chat.make_room(text, "drop")
    assert dropped >= 1
    assert chat.messages == before[2 * dropped :]
    reply = "".join(chat.send(text))
    assert chat.messages[-2:] == [
        {"role": "user", "content": text},
        {"role": "assistant", "content": reply},
    ]
    assert chat.system == "Be brief."
    assert chat.last_turn.prompt_tokens + 8 <= 160


def test_overflow_then_clear(bpe_lm):
    chat = session(bpe_lm, context_length=160, system="Be brief.")
    text = _fill(chat)
    turns = len(chat.messages) // 2
    assert chat.make_room(text, "clear") == turns
    assert chat.messages == []
    "".join(chat.send(text))
    assert len(chat.messages) == 2 and chat.system == "Be brief."


def test_message_too_long_for_the_context_even_alone(bpe_lm):
    chat = session(bpe_lm, context_length=64)
    "".join(chat.send("hi"))
    before = list(chat.messages)
    long = " ".join(["word"] * 200)
    with pytest.raises(ContextLengthExceededError):
        chat.send(long)
    for how in ("drop", "clear"):
        with pytest.raises(ContextLengthExceededError):
            chat.make_room(long, how)
        assert chat.messages == before  # nothing is given up for a message that cannot fit


def test_set_param_parses_and_validates(bpe_lm):
    chat = session(bpe_lm)
    assert chat.set_param("temperature", "0.2").temperature == 0.2
    assert chat.set_param("top-p", "0.9").top_p == 0.9
    assert chat.set_param("top_k", "40").top_k == 40
    assert chat.set_param("seed", "7").seed == 7
    assert chat.set_param("seed", "none").seed is None
    assert chat.set_param("stop", '"###" END').stop == ("###", "END")
    assert chat.set_param("max_tokens", "off").max_tokens is None
    good = chat.params
    for name, value, param in [
        ("temperature", "-1", "temperature"),
        ("temperature", "warm", "temperature"),
        ("top_p", "1.5", "top_p"),
        ("top_k", "2.5", "top_k"),
        ("max_tokens", "0", "max_tokens"),
        ("max_tokens", str(bpe_lm[2].context_length), "max_tokens"),
        ("logprobs", "1", "logprobs"),
    ]:
        with pytest.raises(InvalidRequestError) as err:
            chat.set_param(name, value)
        assert err.value.param == param
        assert chat.params == good  # unchanged


def test_max_tokens_beyond_the_context_is_refused_up_front(bpe_lm):
    with pytest.raises(InvalidRequestError) as err:
        session(bpe_lm, params=GREEDY.replace(max_tokens=5000), context_length=100)
    assert err.value.param == "max_tokens"


def test_save_and_load_round_trip(bpe_lm, tmp_path):
    chat = session(bpe_lm, system="Be brief.")
    "".join(chat.send(MESSAGES[0]))
    chat.set_param("temperature", "0.5")
    path = chat.save(tmp_path / "t.json")
    data = json.loads(path.read_text())
    assert data["system"] == "Be brief."
    assert data["messages"] == chat.messages
    assert data["params"]["temperature"] == 0.5 and data["params"]["max_tokens"] == 8
    assert [p.name for p in tmp_path.iterdir()] == ["t.json"]  # no temporary left behind

    other = session(bpe_lm)
    other.load(path, settings=True)
    assert (other.system, other.messages, other.params) == (chat.system, chat.messages, chat.params)
    "".join(other.send(MESSAGES[1]))
    assert len(other.messages) == 4


def test_load_keeps_the_settings_unless_asked(bpe_lm, tmp_path):
    """A saved max_tokens 40 does not silently replace the 10 the session runs with."""
    saved = session(bpe_lm, params=GREEDY.replace(max_tokens=40), system="Be brief.")
    "".join(saved.send(MESSAGES[0]))
    path = saved.save(tmp_path / "t.json")

    chat = session(bpe_lm, params=GREEDY.replace(max_tokens=10))
    assert chat.load(path) == {"max_tokens": (10, 40)}  # what the file holds, not applied
    assert chat.params.max_tokens == 10
    assert (chat.system, chat.messages) == (saved.system, saved.messages)
    "".join(chat.send(MESSAGES[1]))
    assert chat.last_turn.generation_tokens <= 10

    assert chat.load(path, settings=True) == {"max_tokens": (10, 40)}
    assert chat.params == saved.params and len(chat.messages) == 2
    assert chat.load(path, settings=True) == {}  # nothing left to change


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        "[]",
        '{"messages": [{"role": "assistant", "content": "hi"}]}',
        '{"messages": [{"role": "user", "content": "hi"}]}',
        '{"messages": [], "params": {"temperature": -1}}',
        '{"messages": [], "params": {"logprobs": true}}',
        '{"system": 3, "messages": []}',
    ],
)
def test_load_rejects_bad_transcripts(bpe_lm, tmp_path, content):
    chat = session(bpe_lm, system="keep")
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(InvalidRequestError) as err:
        chat.load(path)
    assert err.value.param == "file"
    assert chat.system == "keep" and chat.params == GREEDY
    with pytest.raises(InvalidRequestError):
        chat.load(tmp_path / "missing.json")
    with pytest.raises(InvalidRequestError):
        chat.save(tmp_path / "no" / "such" / "dir.json")


def test_system_prompt_change_keeps_history(bpe_lm):
    chat = session(bpe_lm)
    "".join(chat.send(MESSAGES[0]))
    chat.set_system("Answer in French.")
    ids = chat.prompt_ids(MESSAGES[1])
    assert bpe_lm[1].decode(ids).startswith("<|im_start|>system\nAnswer in French.")
    "".join(chat.send(MESSAGES[1]))
    assert len(chat.messages) == 4
    chat.clear()
    assert chat.messages == [] and chat.system == "Answer in French."


def test_model_without_a_chat_template(checkpoint_factory, tmp_path):
    """The plain fallback format: its stop strings apply and the cache is still reused."""
    from mlxrun.loader import load

    path = tmp_path / "m"
    shutil.copytree(checkpoint_factory("llama", tokenizer="spm"), path)
    (path / "chat_template.jinja").unlink()
    model, tokenizer, info = load(str(path))
    assert not tokenizer.has_chat_template
    chat = session((model, tokenizer, info))
    assert "\n\nUser:" in chat.turn_params().stop
    for text in MESSAGES[:3]:
        reply = "".join(chat.send(text))
        assert "\n\nUser:" not in reply
    assert chat.last_turn.prefilled_tokens * 2 < chat.last_turn.prompt_tokens
