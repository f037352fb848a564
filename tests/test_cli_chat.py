"""`mlxrun chat` as a user drives it: the real program on a pseudo-terminal (pexpect)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pexpect
import pytest
from click.testing import CliRunner

from mlxrun.chat import ChatSession
from mlxrun.cli.chat import ChatRepl, chat_cmd, read_message
from mlxrun.cli.generate import DEFAULT_MAX_TOKENS
from mlxrun.sampling import SamplingParams
from mlxrun.tokenizer import FALLBACK_NOTICE

CHAT = ["-m", "mlxrun.cli", "chat"]
PROMPT = ">>> "
OVERFLOW = "[d]rop oldest turns / [c]lear / [a]bort? "
FIRST = "def add(a, b):"


@pytest.fixture(scope="module")
def model_dir(checkpoint_factory) -> Path:
    return checkpoint_factory("llama")


@pytest.fixture(scope="module")
def first_reply(model_dir) -> str:
    """What the program must print for FIRST at --temperature 0 --max-tokens 8."""
    from mlxrun.loader import load

    model, tokenizer, info = load(str(model_dir))
    chat = ChatSession(model, tokenizer, SamplingParams(temperature=0, max_tokens=8))
    return "".join(chat.send(FIRST))


def spawn(model_dir: Path, *args: str) -> pexpect.spawn:
    env = {**os.environ, "TERM": "dumb"}
    env.pop("MLXRUN_DEBUG", None)
    child = pexpect.spawn(
        sys.executable, [*CHAT, str(model_dir), *args],
        env=env, encoding="utf-8", timeout=90, dimensions=(50, 300),
    )  # fmt: skip
    child.expect_exact(PROMPT)
    return child


def say(child: pexpect.spawn, line: str) -> str:
    """Send a line, wait for the next prompt; returns what was printed in between."""
    child.sendline(line)
    child.expect_exact(PROMPT)
    return child.before


def on_tty(text: str) -> str:
    return text.replace("\n", "\r\n")  # the terminal's output translation


def _stats_numbers(out: str) -> tuple[int, int, int]:
    m = re.search(r"prompt (\d+) tokens \((\d+) prefilled, (\d+) from the cache\)", out)
    assert m, out
    return int(m[1]), int(m[2]), int(m[3])


def test_a_session_end_to_end(model_dir, first_reply, tmp_path):
    child = spawn(model_dir, "--temperature", "0", "--max-tokens", "8")
    assert on_tty(first_reply) in say(child, FIRST)

    assert "temperature = 0.5" in say(child, "/set temperature 0.5")
    stats = say(child, "/stats")
    for field in ("prefilled", "TTFT", "tok/s", "peak memory", "Cache:", "finish: length"):
        assert field in stats
    assert _stats_numbers(stats)[1] > 0

    transcript = tmp_path / "chat.json"
    assert "Saved 2 messages" in say(child, f"/save {transcript}")
    data = json.loads(transcript.read_text())
    assert data["messages"] == [
        {"role": "user", "content": FIRST},
        {"role": "assistant", "content": first_reply},
    ]
    assert data["params"]["temperature"] == 0.5 and data["system"] is None

    assert "Conversation cleared" in say(child, "/clear")
    assert "turns: 0" in say(child, "/stats")
    assert "Loaded 2 messages" in say(child, f"/load {transcript}")
    assert "turns: 1" in say(child, "/stats")

    out = say(child, "/set temperature -1")
    assert "Error: temperature must be >= 0" in out and "Traceback" not in out
    assert "Error: top_k must be an integer" in say(child, "/set top_k many")
    assert "Error: unknown setting" in say(child, "/set warmth 3")
    assert "Error: unknown command /frobnicate" in say(child, "/frobnicate")
    assert "temperature = 0.5" in say(child, "/set")  # the bad values changed nothing

    # Ctrl-C while a long reply streams: the reply stops, the session lives.
    say(child, "/set temperature 0")
    say(child, "/set max_tokens 1500")
    child.sendline("tell me more")
    child.expect_exact("tell me more\r\n")
    child.expect(r"\S")  # the reply has started
    child.sendintr()
    child.expect_exact("[stopped]")
    child.expect_exact(PROMPT)
    stats = say(child, "/stats")
    assert "finish: interrupted" in stats
    prompt_tokens, _, _ = _stats_numbers(stats)

    # The next turn reuses the cache, interrupted reply included.
    say(child, "/set max_tokens 8")
    say(child, "hello")
    _, prefilled, reused = _stats_numbers(say(child, "/stats"))
    assert reused > prompt_tokens and prefilled < 30

    assert "/save FILE" in say(child, "/help")
    say(child, "//usr is a directory")  # "//" sends a message that starts with "/"

    # Multi-line input: a \"\"\" block and a backslash continuation.
    child.sendline('"""')
    child.sendline("first line")
    say(child, 'second line"""')
    child.sendline("a\\")
    say(child, "b")
    say(child, f"/save {transcript}")
    users = [m["content"] for m in json.loads(transcript.read_text())["messages"][::2]]
    assert users[-3:] == ["/usr is a directory", "first line\nsecond line", "a\nb"]

    # Ctrl-C at the prompt drops the line being typed; Ctrl-D exits cleanly.
    # Let readline settle at the prompt first: keys typed while it sets the terminal up can be
    # lost on a loaded machine, and then neither the text nor the Ctrl-C reaches it.
    time.sleep(0.5)
    child.send("half a line")
    child.expect_exact("half a line")
    child.sendintr()
    child.expect_exact(PROMPT)
    assert "turns: 6" in say(child, "/stats")  # the dropped line was not sent
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    history = Path(os.environ["MLXRUN_HOME"]) / "chat_history"
    assert "/set temperature 0.5" in history.read_text()


def test_load_restores_settings_only_when_asked(model_dir, tmp_path, capsys):
    """/load FILE keeps the current settings and names the file's that differ; /load FILE
    --settings restores them and says which changed."""
    from mlxrun.loader import load

    model, tokenizer, info = load(str(model_dir))
    path = tmp_path / "saved chat.json"  # a name with a space: the whole rest of the line
    saved = ChatSession(model, tokenizer, SamplingParams(temperature=0.5, max_tokens=40))
    "".join(saved.send(FIRST))
    saved.save(path)

    chat = ChatSession(model, tokenizer, SamplingParams(temperature=0.2, max_tokens=10))
    lines = [f"/load {path}", "/set", f"/load {path} --settings", "/set", "/load --settings"]
    read_line, _ = _reader(lines)

    def marked(prompt: str) -> str:
        print("\x00", end="")  # where one command's output ends
        return read_line(prompt)

    ChatRepl(chat, "tiny", marked).run()
    out, err = capsys.readouterr()
    kept, after_kept, restored, after_restored = (b.strip() for b in out.split("\x00")[1:5])
    assert kept.startswith(f"Loaded 2 messages from {path}; kept the current settings")
    assert "max_tokens 40" in kept and "temperature 0.5" in kept and "--settings" in kept
    assert "max_tokens = 10" in after_kept and "temperature = 0.2" in after_kept
    assert restored.startswith(f"Loaded 2 messages and the settings from {path}:")
    assert "max_tokens 10 -> 40" in restored and "temperature 0.2 -> 0.5" in restored
    assert "max_tokens = 40" in after_restored and chat.params == saved.params
    assert "Usage: /load FILE [--settings]" in err


def _settings_shown(*args: str) -> tuple[dict[str, str], str]:
    """`/set` in a chat started with args: the settings it lists, and what went to stderr."""
    result = CliRunner().invoke(chat_cmd, list(args), input="/set\n")
    assert result.exit_code == 0, result.output
    pairs = [line.strip().split(" = ", 1) for line in result.stdout.splitlines() if " = " in line]
    return dict(pairs), result.stderr


def test_a_reply_has_a_default_cap(model_dir):
    """The same default as generate; half the context at most; --max-tokens sets it."""
    assert _settings_shown(str(model_dir))[0]["max_tokens"] == str(DEFAULT_MAX_TOKENS)
    assert _settings_shown(str(model_dir), "--context", "300")[0]["max_tokens"] == "150"
    assert _settings_shown(str(model_dir), "--max-tokens", "10")[0]["max_tokens"] == "10"


def test_a_model_without_a_chat_template_is_announced_once(model_dir, checkpoint_factory, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(checkpoint_factory("llama", tokenizer="spm"), base)
    (base / "chat_template.jinja").unlink()  # a base model ships none
    _, err = _settings_shown(str(base))
    assert err.splitlines().count(FALLBACK_NOTICE) == 1
    assert FALLBACK_NOTICE not in _settings_shown(str(model_dir))[1]


def test_context_overflow_asks_what_to_do(model_dir):
    child = spawn(model_dir, "--temperature", "0", "--max-tokens", "8", "--context", "120")
    for i in range(30):
        child.sendline(f"x = {i} # the value")
        if child.expect_exact([PROMPT, OVERFLOW]) == 1:
            break
    else:
        raise AssertionError("the context never filled")
    assert "would not fit the 120-token context" in child.before
    child.sendline("d")
    child.expect_exact(PROMPT)
    assert "Dropped" in child.before
    turns = int(re.search(r"turns: (\d+)", say(child, "/stats"))[1])
    assert turns >= 1

    for i in range(30):
        child.sendline(f"y = {i} # the value")
        if child.expect_exact([PROMPT, OVERFLOW]) == 1:
            break
    child.sendline("c")
    child.expect_exact(PROMPT)
    assert "Cleared the conversation" in child.before
    assert "turns: 1" in say(child, "/stats")  # the message went through after clearing

    long = " ".join(["word"] * 150)
    child.sendline(long)
    child.expect_exact(OVERFLOW)
    child.sendline("d")
    child.expect_exact(PROMPT)
    assert "the message alone does not fit" in child.before
    child.sendline(long)
    child.expect_exact(OVERFLOW)
    child.sendline("a")
    child.expect_exact(PROMPT)
    assert "Not sent" in child.before
    assert "turns: 1" in say(child, "/stats")  # the history outlived the hopeless message

    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_piped_input_without_a_terminal(model_dir):
    proc = subprocess.run(
        [sys.executable, *CHAT, str(model_dir), "--temperature", "0", "--max-tokens", "4"],
        input=b"hello\n/stats\n", capture_output=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()
    out = proc.stdout.decode()
    assert "prefilled" in out and "turns: 1" in out


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--temperature", "-1"], "--temperature"),
        (["--context", "0"], "--context"),
    ],
)
def test_bad_flags_give_one_line(model_dir, args, expected):
    proc = subprocess.run(
        [sys.executable, *CHAT, str(model_dir), *args],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=120,
    )  # fmt: skip
    err = proc.stderr.decode()
    assert proc.returncode != 0 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and expected in errors[0], err


def _reader(lines: list[str]):
    feed = iter(lines)
    prompts: list[str] = []

    def read_line(prompt: str) -> str:
        prompts.append(prompt)
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    return read_line, prompts


@pytest.mark.parametrize(
    "lines, message, reads",
    [
        (["hello"], "hello", 1),
        (["one\\", "two\\", "three"], "one\ntwo\nthree", 3),
        (['"""', "  indented", "", 'end"""'], "  indented\n\nend", 4),
        (['"""start', 'stop"""'], "start\nstop", 2),
        (['"""inline"""'], "inline", 1),
        (['"""', "body", '"""'], "body", 3),
    ],
)
def test_read_message(lines, message, reads):
    read_line, prompts = _reader(lines)
    assert read_message(read_line) == message
    assert prompts == [">>> "] + ["... "] * (reads - 1)


def test_read_message_eof_inside_a_block():
    read_line, _ = _reader(['"""', "never closed"])
    with pytest.raises(EOFError):
        read_message(read_line)
