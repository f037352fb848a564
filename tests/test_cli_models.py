"""The CLI around many models: `serve` with several, one or no model, `run`, `ps`, `show` with
models.toml, and the one-line answer when the store is empty (subprocesses, as users run them)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time

import httpx
import openai
import pytest
from click.testing import CliRunner

from mlxrun.cli.run import ps_cmd
from serverutil import CLI, wait_healthy

MLXRUN = [sys.executable, "-m", "mlxrun"]


@pytest.fixture
def home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    monkeypatch.setenv("MLXRUN_HOME", str(home))
    return home


def _store(home, src, name: str) -> None:
    shutil.copytree(src, home / "models" / name)


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*MLXRUN, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ})  # fmt: skip


@pytest.mark.model
@pytest.mark.parametrize("command", [["serve"], ["chat"]])
def test_no_model_and_an_empty_store_is_one_line_saying_how_to_get_one(home, command):
    proc = _run(*command, "--port", "0") if command == ["serve"] else _run(*command)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "none in the store" in lines[0] and "mlxrun pull" in lines[0]


@pytest.mark.model
def test_show_prints_models_toml_settings(home, tiny_llama):
    _store(home, tiny_llama, "coder")
    (home / "models.toml").write_text(
        '[models.coder]\nalias = ["c", "gpt-4o"]\ncontext = 256\nkeep_alive = "30m"\n'
        "[models.coder.sampling]\ntemperature = 0.2\n"
    )
    proc = _run("show", "coder")
    assert proc.returncode == 0, proc.stderr
    rows = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in proc.stdout.splitlines())
    assert rows["settings.alias"] == "c, gpt-4o" and rows["settings.context"] == "256"
    assert rows["settings.keep_alive"] == "30m" and rows["settings.sampling.temperature"] == "0.2"
    (home / "models.toml").write_text("[models.coder]\ncontext = 'x'\n")
    proc = _run("show", "coder")
    assert proc.returncode != 0 and "models.toml" in proc.stderr and "context" in proc.stderr


@pytest.mark.model
def test_run_with_a_prompt_prints_one_reply(home, tiny_llama):
    _store(home, tiny_llama, "tiny")
    (home / "models.toml").write_text("[models.tiny.sampling]\ntemperature = 0\nmax_tokens = 5\n")
    first = _run("run", "tiny", "Hello")
    again = _run("run", "tiny", "Hello")
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() and first.stdout == again.stdout  # greedy, from models.toml
    assert re.search(r"\b5 tokens\b", first.stderr), first.stderr  # max_tokens from models.toml


def _serve(*args: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([*CLI, *args, "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    lines = []
    for line in proc.stdout:
        lines.append(line)
        found = re.search(r"OpenAI base URL: (http://\S+)/v1", line)
        if found:
            wait_healthy(found.group(1), proc=proc)
            return proc, found.group(1)
    proc.wait(timeout=30)
    raise RuntimeError("".join(lines) + proc.stderr.read())


@pytest.mark.server
def test_serve_several_models_then_ps(home, checkpoint_factory):
    for i in range(2):
        _store(home, checkpoint_factory("llama", num_shards=1, seed=i), f"m{i}")
    (home / "models.toml").write_text('[models.m0]\nalias = "coder"\nkeep_alive = "2s"\n')
    proc, base = _serve("--context", "256", "--keep-alive", "-1")  # no names: the whole store
    try:
        listed = {m["id"] for m in httpx.get(base + "/v1/models").json()["data"]}
        assert listed == {"m0", "coder", "m1"}
        # models.toml: the alias picks m0, whose own 2 s keep-alive beats --keep-alive -1.
        r = httpx.post(
            base + "/v1/completions", json={"model": "coder", "prompt": "x", "max_tokens": 1}
        )
        assert r.status_code == 200 and r.json()["model"] == "coder"
        assert [m["name"] for m in httpx.get(base + "/api/ps").json()["models"]] == ["m0:latest"]
        deadline = time.monotonic() + 10
        while httpx.get(base + "/api/ps").json()["models"] and time.monotonic() < deadline:
            time.sleep(0.1)
        tags = {m["name"] for m in httpx.get(base + "/api/tags").json()["models"]}
        assert tags == {"m0:latest", "m1:latest"}
        assert httpx.get(base + "/api/ps").json()["models"] == []  # nothing loaded yet
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
        client.chat.completions.create(model="m1:latest", max_tokens=2,
                                       messages=[{"role": "user", "content": "hi"}])  # fmt: skip
        result = CliRunner().invoke(ps_cmd, ["--url", base])
        assert result.exit_code == 0, result.output
        header, row = result.output.strip().splitlines()
        assert header.split()[:3] == ["NAME", "MEMORY", "RUNNING"]
        assert row.startswith("m1:latest") and row.endswith("Forever")
        assert re.search(r"\d\.\d\d [MG]B", row)  # weights + KV + the prefix cache
    finally:
        proc.terminate()
        proc.wait(30)
    result = CliRunner().invoke(ps_cmd, ["--url", base])
    assert result.exit_code != 0 and "no mlxrun server" in result.output


@pytest.mark.server
def test_serve_with_names_preloads_the_first_and_checks_flags(home, checkpoint_factory):
    a, b = (checkpoint_factory("llama", num_shards=1, seed=i) for i in range(2))
    proc = _run("serve", str(a), "--memory-budget", "lots", "--port", "0")
    assert proc.returncode != 0 and "--memory-budget" in proc.stderr
    proc = _run("serve", str(a), "--keep-alive", "soon", "--port", "0")
    assert proc.returncode != 0 and "--keep-alive" in proc.stderr
    proc, base = _serve(str(a), str(b), "--context", "256", "--max-loaded", "1")
    try:
        loaded = [m["name"] for m in httpx.get(base + "/api/ps").json()["models"]]
        assert loaded == [f"{a.name}:latest"]  # the default is in memory before the banner
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
        client.chat.completions.create(model=b.name, max_tokens=2,
                                       messages=[{"role": "user", "content": "hi"}])  # fmt: skip
        loaded = [m["name"] for m in httpx.get(base + "/api/ps").json()["models"]]
        assert loaded == [f"{b.name}:latest"]  # --max-loaded 1: the idle default made room
        metrics = httpx.get(base + "/metrics").text
        assert f'mlxrun_model_evictions_total{{model="{a.name}"}} 1' in metrics
        assert re.search(rf'mlxrun_model_load_seconds_total{{model="{b.name}"}} [0-9.]+', metrics)
    finally:
        proc.terminate()
        proc.wait(30)
