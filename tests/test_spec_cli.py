"""`mlxrun serve --draft / --speculate` as users run it: proposals are verified (the metrics say
how many were accepted), the answer is the plain one, and a draft with another tokenizer stops
the server before it starts, with one line that names the problem."""

from __future__ import annotations

import subprocess
import sys

import httpx
import openai
import pytest

from serverutil import CLI, MODEL_ID, make_app, serve_in_thread, start_cli

pytestmark = pytest.mark.server

MESSAGES = [{"role": "user", "content": "Rename the variable x to count in this file."}]


def _gauge(base_url: str, name: str) -> float:
    for line in httpx.get(base_url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.fixture(scope="module")
def plain_answer(tiny_llama):
    with serve_in_thread(make_app(tiny_llama)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        out = client.chat.completions.create(
            model=MODEL_ID, messages=MESSAGES, temperature=0, max_tokens=40
        )
        return out.choices[0].message.content


@pytest.mark.parametrize("flags", [("--draft", "SELF"), ("--speculate", "ngram")])
def test_serve_speculates_and_answers_as_without(tiny_llama, plain_answer, flags):
    args = [str(tiny_llama) if a == "SELF" else a for a in flags]
    proc, base_url = start_cli(tiny_llama, *args, "--alias", MODEL_ID)
    try:
        client = openai.OpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0)
        out = client.chat.completions.create(
            model=MODEL_ID, messages=MESSAGES, temperature=0, max_tokens=40
        )
        assert out.choices[0].message.content == plain_answer
        rate = _gauge(base_url, "mlxrun_speculation_acceptance_rate")
        per_step = _gauge(base_url, "mlxrun_speculation_tokens_per_step")
        if flags[0] == "--draft":  # the target drafting for itself agrees with itself
            assert rate == 1.0 and per_step > 2
        else:
            assert 0 <= rate <= 1 and per_step >= 1
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_a_draft_with_another_tokenizer_stops_serve_with_one_line(tiny_llama, checkpoint_factory):
    other = checkpoint_factory("llama", tokenizer="spm", num_layers=1, num_shards=1)
    proc = subprocess.run(
        [*CLI, str(tiny_llama), "--port", "0", "--draft", str(other)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "tokenizer" in proc.stderr and "Traceback" not in proc.stderr
    assert "same tokenizer" in proc.stderr  # the hint: what to do instead


GENERATE = [sys.executable, "-m", "mlxrun.cli", "generate"]
PROMPT = "def add(a, b):\n    return a + b\n"


def _generate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*GENERATE, *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("flags", [("--draft", "SELF"), ("--speculate", "ngram")])
def test_generate_speculates_and_prints_the_plain_text(tiny_llama, flags):
    base = [str(tiny_llama), "-p", PROMPT, "--temperature", "0", "--max-tokens", "30"]
    plain = _generate(*base)
    args = [str(tiny_llama) if a == "SELF" else a for a in flags]
    fast = _generate(*base, *args, "--num-speculative-tokens", "4")
    assert plain.returncode == fast.returncode == 0, fast.stderr
    assert fast.stdout == plain.stdout and len(plain.stdout) > 10


def test_generate_and_chat_refuse_a_draft_with_another_tokenizer(tiny_llama, checkpoint_factory):
    other = str(checkpoint_factory("llama", tokenizer="spm", num_layers=1, num_shards=1))
    proc = _generate(str(tiny_llama), "-p", PROMPT, "--draft", other)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "tokenizer" in proc.stderr
    chat = subprocess.run(
        [sys.executable, "-m", "mlxrun.cli", "chat", str(tiny_llama), "--draft", other],
        input="hello\n/exit\n", capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert chat.returncode != 0 and "tokenizer" in chat.stderr
