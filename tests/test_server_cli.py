"""`mlxrun serve` as users run it (a subprocess): banner, API key, CORS, clean shutdown on SIGTERM
and Ctrl-C with a stream in flight, and one-line errors for a busy port or a missing model."""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import threading
import time

import httpx
import openai
import pytest

from serverutil import CLI, start_cli

MESSAGES = [{"role": "user", "content": "hello"}]


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    assert lines[0].startswith("Error: ")
    return lines[0]


@pytest.mark.server
def test_busy_port_is_one_line(tiny_llama):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [*CLI, str(tiny_llama), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    line = _one_error_line(proc)
    assert f"127.0.0.1:{port}" in line and "--port" in line


@pytest.mark.server
def test_missing_model_is_one_line(tmp_path):
    proc = subprocess.run(
        [*CLI, str(tmp_path / "nothing-here"), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    _one_error_line(proc)


def _stream_in_background(base_url: str, headers: dict) -> tuple[threading.Thread, list]:
    """A long stream (450 tokens, " the" forced so it cannot end early) read in a thread."""
    ids = httpx.post(base_url + "/tokenize", json={"prompt": " the", "add_special_tokens": False},
                     headers=headers).json()["tokens"]  # fmt: skip
    body = {"model": "tiny-cli", "messages": MESSAGES, "max_tokens": 450, "stream": True,
            "logit_bias": {str(ids[0]): 100}}  # fmt: skip
    got: list = []
    started = threading.Event()

    def read() -> None:
        try:
            with httpx.stream("POST", base_url + "/v1/chat/completions", json=body,
                              headers=headers, timeout=60) as r:  # fmt: skip
                for line in r.iter_lines():
                    got.append(line)
                    started.set()
        except httpx.HTTPError as e:  # the server may cut the stream when it stops
            got.append(e)
        started.set()

    thread = threading.Thread(target=read)
    thread.start()
    assert started.wait(60)
    return thread, got


def _stop(proc: subprocess.Popen, sig: int) -> tuple[str, str]:
    start = time.monotonic()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    assert time.monotonic() - start < 20, "shutdown took too long"
    assert proc.returncode == 0, err
    assert "Stopped." in out and "Traceback" not in err
    return out, err


@pytest.mark.server
def test_api_key_cors_and_sigterm(tiny_llama):
    proc, base_url = start_cli(
        tiny_llama,
        "--api-key",
        "sekret",
        "--alias",
        "tiny-cli",
        "--cors-origin",
        "http://ok.example",
    )
    try:
        key = {"Authorization": "Bearer sekret"}
        assert httpx.get(base_url + "/health").status_code == 200  # open without a key
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
            r = httpx.get(base_url + "/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.post(base_url + "/metrics", headers={}).status_code == 401
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base_url + "/v1", api_key="nope", max_retries=0).models.list()
        client = openai.OpenAI(base_url=base_url + "/v1", api_key="sekret", max_retries=0)
        assert [m.id for m in client.models.list().data][1] == "tiny-cli"
        r = client.chat.completions.create(
            model="tiny-cli", messages=MESSAGES, max_tokens=2, temperature=0
        )  # greedy: a sampled first token may be EOS on random weights
        assert r.usage.completion_tokens == 2
        # CORS: preflights from the allowed origin pass (before auth), others get no grant.
        pre = {"Origin": "http://ok.example", "Access-Control-Request-Method": "POST",
               "Access-Control-Request-Headers": "authorization,content-type"}  # fmt: skip
        r = httpx.options(base_url + "/v1/chat/completions", headers=pre)
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "http://ok.example"
        r = httpx.get(base_url + "/v1/models", headers={**key, "Origin": "http://ok.example"})
        assert r.headers["access-control-allow-origin"] == "http://ok.example"
        r = httpx.get(base_url + "/v1/models", headers={**key, "Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in r.headers
        # SIGTERM with a stream in flight: it finishes or is cut, and the process exits 0.
        thread, got = _stream_in_background(base_url, key)
        _stop(proc, signal.SIGTERM)
        thread.join(timeout=30)
        assert not thread.is_alive() and got
        banner = proc.banner
        assert f"{base_url}/v1" in banner and "tiny-cli" in banner and "required" in banner
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.server
def test_env_api_key_no_cors_and_ctrl_c(tiny_llama):
    proc, base_url = start_cli(
        tiny_llama, "--alias", "tiny-cli", env={"MLXRUN_API_KEY": "from-env"}
    )
    try:
        assert httpx.get(base_url + "/v1/models").status_code == 401
        r = httpx.get(base_url + "/v1/models", headers={"Authorization": "Bearer from-env",
                                                         "Origin": "http://ok.example"})  # fmt: skip
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
        _stop(proc, signal.SIGINT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.TransportError:
        return None  # not listening yet


@pytest.mark.server
def test_banner_means_ready_at_a_reachable_address(tiny_llama, tmp_path):
    """`--host 0.0.0.0`: the banner shows addresses a client can use, and it is printed once the
    server answers: /health is 200 right after it, and before it no model route said 200 while
    /health said 503. Each request leaves an access log line (on stderr)."""
    port = _free_port()
    local = f"http://127.0.0.1:{port}"
    errors = (tmp_path / "stderr").open("w+")
    proc = subprocess.Popen([*CLI, str(tiny_llama), "--host", "0.0.0.0", "--port", str(port),
                             "--context", "512", "--no-auth"], stdout=subprocess.PIPE, stderr=errors, text=True)  # fmt: skip
    seen: list[tuple[int | None, int | None]] = []  # (/v1/models, /health) per round
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            models = _status(local + "/v1/models")  # first: ready then means ready after
            seen.append((models, _status(local + "/health")))
            time.sleep(0.02)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        assert proc.stdout is not None
        banner = []
        for line in proc.stdout:
            banner.append(line)
            if line.startswith("Press Ctrl-C"):
                break
        assert _status(local + "/health") == 200  # the banner came once the server was ready
        done.set()
        poller.join()
        text = "".join(banner)
        assert f"OpenAI base URL: {local}/v1" in text and "0.0.0.0" not in text, text
        for line in banner:  # the machine's LAN address, when it has one, is reachable too
            if "on the network:" in line:
                assert _status(line.split()[-1].removesuffix("/v1") + "/health") == 200
        # The routes agree: /v1/models never answered while /health still said "loading".
        assert not [pair for pair in seen if pair[0] == 200 and pair[1] != 200], seen
        assert {m for m, _ in seen} <= {None, 503, 200}
        assert httpx.get(local + "/v1/models").status_code == 200
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0 and "Stopped." in out
        errors.seek(0)
        log = errors.read()
        assert " GET /v1/models 200 " in log and "req_" in log and "Traceback" not in log, log
    finally:
        done.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.pure
def test_wildcard_hosts_show_loopback_first_and_log_levels():
    from mlxrun.server.cli import _base_urls, _setup_logging

    urls = _base_urls("0.0.0.0", 8080)
    assert urls[0] == "http://127.0.0.1:8080/v1" and not any("0.0.0.0" in u for u in urls)
    assert _base_urls("::", 8080)[0] == "http://[::1]:8080/v1"
    assert _base_urls("192.168.1.5", 80) == ["http://192.168.1.5:80/v1"]
    logger = logging.getLogger("mlxrun")
    saved = (logger.level, logger.propagate, list(logger.handlers))
    try:
        access = logging.getLogger("mlxrun.access")
        _setup_logging("info")
        assert access.isEnabledFor(logging.INFO)
        _setup_logging("warning")  # what --quiet sets
        assert not access.isEnabledFor(logging.INFO)
        assert len(logger.handlers) == len(saved[2]) + 1  # set up twice, one handler
    finally:
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        logger.handlers[:] = saved[2]
