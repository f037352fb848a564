"""`mlxrun generate` as a user runs it: a real subprocess against a tiny fixture model."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from mlxrun.cli.generate import DEFAULT_MAX_TOKENS
from mlxrun.generate import generate_stream
from mlxrun.sampling import SamplingParams
from mlxrun.tokenizer import FALLBACK_NOTICE

PROMPT = "def add(a, b):\n    return a + b\n"
CLI = [sys.executable, "-m", "mlxrun.cli", "generate"]


def run_cli(*args: str, stdin: bytes | None = None, env: dict | None = None, timeout: float = 120):
    return subprocess.run(
        [*CLI, *args],
        input=stdin,
        capture_output=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    err = proc.stderr.decode()
    assert proc.returncode != 0
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("Error: ")
    return lines[0]


@pytest.fixture(scope="module")
def model_dir(checkpoint_factory):
    return checkpoint_factory("llama")


@pytest.fixture(scope="module")
def lm(model_dir):
    from mlxrun.loader import load

    return load(str(model_dir))


def _expected(lm, ids: list[int], max_tokens: int, **kw) -> str:
    model, tokenizer, _ = lm
    params = SamplingParams(temperature=0, max_tokens=max_tokens, **kw)
    return "".join(c.text for c in generate_stream(model, tokenizer, ids, params))


def test_streams_completion_and_stats(model_dir, lm):
    proc = run_cli(str(model_dir), "-p", PROMPT, "--temperature", "0", "--max-tokens", "12")
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode() == _expected(lm, lm[1].encode(PROMPT), 12)
    err = proc.stderr.decode()
    assert "prompt:" in err and "generation: 12 tokens" in err
    assert "tok/s" in err and "peak memory" in err


def test_stdin_prompt_and_stop_string(model_dir, lm):
    full = _expected(lm, lm[1].encode(PROMPT), 20)
    stop = full[8:11]
    args = ["-p", "-", "--temperature", "0", "--max-tokens", "20", "--stop", stop]
    proc = run_cli(str(model_dir), *args, stdin=PROMPT.encode())
    assert proc.returncode == 0, proc.stderr.decode()
    out = proc.stdout.decode()
    assert out == full[: full.index(stop)] and stop not in out
    assert "finish: stop" in proc.stderr.decode()


def test_chat_with_system(model_dir, lm):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    ids = lm[1].apply_chat_template(messages, add_generation_prompt=True)
    proc = run_cli(str(model_dir), "-p", "hi", "--chat", "--system", "Be brief.",
                   "--temperature", "0", "--max-tokens", "8")  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode() == _expected(lm, ids, 8)
    assert f"prompt: {len(ids)} tokens" in proc.stderr.decode()


def test_output_is_streamed_before_the_end(model_dir):
    proc = subprocess.Popen(
        [*CLI, str(model_dir), "-p", PROMPT, "--max-tokens", "1900", "--seed", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        first = proc.stdout.read(1)  # blocks until the CLI flushes its first text
        assert first
        time.sleep(0.2)
        assert proc.poll() is None  # still generating
    finally:
        proc.kill()
        proc.wait()


def test_store_name_and_sampling_flags(model_dir):
    from mlxrun.store import models_dir

    models_dir().mkdir(parents=True, exist_ok=True)
    shutil.copytree(model_dir, models_dir() / "tiny")
    args = ["tiny", "-p", PROMPT, "--max-tokens", "10", "--seed", "3", "--top-p", "0.9",
            "--top-k", "50", "--min-p", "0.01", "--repetition-penalty", "1.1",
            "--presence-penalty", "0.5", "--frequency-penalty", "0.5"]  # fmt: skip
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr.decode()
    assert "generation: 10 tokens" in proc.stderr.decode()


def test_unknown_model_suggests_list():
    line = _one_error_line(run_cli("no-such-model", "-p", "hi"))
    assert "no-such-model" in line and "mlxrun list" in line


def test_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "readme.txt").write_text("not a model")
    line = _one_error_line(run_cli(str(tmp_path), "-p", "hi"))
    assert "config.json" in line


def test_prompt_longer_than_context(model_dir, lm):
    n = len(lm[1].encode(PROMPT))
    line = _one_error_line(run_cli(str(model_dir), "-p", PROMPT, "--context", "5"))
    assert f"{n} tokens" in line and "context length is 5" in line


@pytest.mark.parametrize(
    "flag,value", [("--temperature", "-1"), ("--top-p", "1.5"), ("--presence-penalty", "3")]
)
def test_invalid_sampling_value_names_the_flag(model_dir, flag, value):
    line = _one_error_line(run_cli(str(model_dir), "-p", "hi", flag, value))
    assert flag in line


def test_binary_stdin_is_rejected(model_dir):
    line = _one_error_line(run_cli(str(model_dir), "-p", "-", stdin=b"\xff\xfe\x00\x9c binary"))
    assert "UTF-8" in line


def test_memory_check_and_force(model_dir):
    env = {"MLXRUN_MEMORY_BUDGET": "50MB"}
    line = _one_error_line(run_cli(str(model_dir), "-p", "hi", env=env))
    assert "missing" in line and "--force" in line
    proc = run_cli(str(model_dir), "-p", "hi", "--max-tokens", "3", "--force", env=env)
    assert proc.returncode == 0, proc.stderr.decode()


def test_debug_shows_traceback():
    proc = run_cli("no-such-model", "-p", "hi", env={"MLXRUN_DEBUG": "1"})
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr.decode()


def test_without_max_tokens_a_base_model_stops_at_the_default(model_dir, lm):
    """Greedy, this random model never emits EOS: it used to run to the end of the context."""
    assert DEFAULT_MAX_TOKENS == 256 and lm[2].context_length > 2 * DEFAULT_MAX_TOKENS
    proc = run_cli(str(model_dir), "-p", PROMPT, "--temperature", "0")
    assert proc.returncode == 0, proc.stderr.decode()
    err = proc.stderr.decode()
    assert f"generation: {DEFAULT_MAX_TOKENS} tokens" in err and "finish: length" in err
    assert proc.stdout.decode() == _expected(lm, lm[1].encode(PROMPT), DEFAULT_MAX_TOKENS)
    # With less context left than the default, the default shrinks to fit instead of failing.
    n = len(lm[1].encode(PROMPT))
    proc = run_cli(str(model_dir), "-p", PROMPT, "--temperature", "0", "--context", str(n + 5))
    assert proc.returncode == 0, proc.stderr.decode()
    assert "generation: 5 tokens" in proc.stderr.decode()
    help_text = run_cli("--help").stdout.decode()
    assert f"[default: {DEFAULT_MAX_TOKENS}" in " ".join(help_text.split())


@pytest.fixture(scope="module")
def no_template_dir(checkpoint_factory, tmp_path_factory):
    """A base model as downloaded: the spm checkpoint with no chat template at all."""
    path = tmp_path_factory.mktemp("base") / "model"
    shutil.copytree(checkpoint_factory("llama", tokenizer="spm"), path)
    (path / "chat_template.jinja").unlink()
    assert "chat_template" not in (path / "tokenizer_config.json").read_text()
    return path


def test_chat_on_a_model_without_a_template_says_so_once(no_template_dir, model_dir):
    args = ["-p", "hi", "--chat", "--max-tokens", "3"]
    proc = run_cli(str(no_template_dir), *args)
    assert proc.returncode == 0, proc.stderr.decode()
    lines = proc.stderr.decode().splitlines()
    assert lines.count(FALLBACK_NOTICE) == 1 and len(lines) == 2  # the notice and the stats
    plain = run_cli(str(no_template_dir), "-p", "hi", "--max-tokens", "3")  # no template used
    templated = run_cli(str(model_dir), *args)
    for proc in (plain, templated):
        assert proc.returncode == 0 and FALLBACK_NOTICE not in proc.stderr.decode()
