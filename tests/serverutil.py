"""Real servers for the server tests: uvicorn on a free loopback port, in a thread or a subprocess.

with serve_in_thread(app) as base_url:      # app from make_app(model_dir, ...)
    httpx.get(base_url + "/health")

proc, base_url = start_cli(model_dir, "--api-key", "k")   # `mlxrun serve` as users run it
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import uvicorn

MODEL_ID = "tiny"

# Tool parameter schemas the dialect tests share (small enough for random weights to finish).
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 10},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
ADD = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    "required": ["a", "b"],
    "additionalProperties": False,
}


def make_app(
    model_dir: Path,
    *,
    context: int | None = 512,
    max_running: int = 16,
    max_waiting: int = 256,
    cache_memory_bytes: int = 64 << 20,
    speculate: Any = None,
    **server: Any,
) -> Any:
    """An app over a real engine for `model_dir` (served as MODEL_ID unless model_id is given)."""
    import mlx.core as mx

    from mlxrun.engine import Engine, EngineConfig
    from mlxrun.loader import load
    from mlxrun.server.app import ServerConfig, create_app

    model, tokenizer, info = load(str(model_dir), context=context)
    mx.eval(model.parameters())  # lazy weights belong to this thread; the engine starts elsewhere
    engine = Engine(
        model,
        EngineConfig(
            max_running=max_running,
            max_waiting=max_waiting,
            cache_memory_bytes=cache_memory_bytes,
            eos_token_ids=tuple(sorted(tokenizer.eos_token_ids)),
            namespace=str(model_dir),
            context_length=info.context_length,
            **({} if speculate is None else {"speculate": speculate}),  # a SpecConfig
        ),
    )
    server.setdefault("model_id", MODEL_ID)
    config = ServerConfig(context_length=info.context_length, **server)
    return create_app(engine, config, tokenizer=tokenizer)


def _free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


def wait_healthy(base_url: str, timeout: float = 120, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            r = httpx.get(base_url + "/health", timeout=5)
        except httpx.TransportError:
            r = None
        if r is not None and r.status_code == 200:
            return
        if r is not None and r.json().get("status") == "error":
            raise RuntimeError(f"the engine failed to start: {r.text}")
        time.sleep(0.05)
    raise TimeoutError(f"{base_url} did not become healthy in {timeout} s")


@contextlib.contextmanager
def serve_in_thread(app: Any, *, wait: bool = True, graceful_s: float = 2) -> Iterator[str]:
    """Run `app` with uvicorn on a free loopback port; yields the base URL (no /v1)."""
    sock = _free_socket()
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, log_level="warning", lifespan="on", timeout_graceful_shutdown=graceful_s
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        if wait:
            wait_healthy(base_url)
        yield base_url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
        if thread.is_alive():
            raise RuntimeError("the server thread did not stop")


CLI = [sys.executable, "-c", "from mlxrun.server.cli import serve_cmd; serve_cmd()"]


def start_cli(model_dir: Path, *args: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """`mlxrun serve MODEL --port 0 ARGS` in a subprocess; returns it (with its startup banner as
    `.banner`) and its base URL (no /v1) once it answers /health."""
    proc = subprocess.Popen(
        [*CLI, str(model_dir), "--port", "0", "--context", "512", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
        text=True,
    )
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        found = re.search(r"OpenAI base URL: (http://\S+)/v1", line)
        if found:
            base_url = found.group(1)
            for rest in proc.stdout:  # the rest of the banner
                lines.append(rest)
                if rest.startswith("Press Ctrl-C"):
                    break
            wait_healthy(base_url, proc=proc)
            proc.banner = "".join(lines)  # type: ignore[attr-defined]
            return proc, base_url
    proc.wait(timeout=30)
    raise RuntimeError(f"`mlxrun serve` exited: {''.join(lines)}{proc.stderr.read()}")
