"""Serving under load: `mlxrun serve` against `mlx_lm.server` on the same model, same requests.

    python benchmarks/serve_load.py [--model ../shared/models/pycode-16m] [--clients 1 4 8 16]

Each server runs alone (one after the other, so they never share the CPU/GPU). At each level, N
clients each send --requests streaming /v1/completions requests back to back (temperature 0, the
same prompts and max_tokens for both servers). Reported per level: aggregate generated tokens/s
(tokens from the servers' own usage counts, over the level's wall time), p50 / p99 time to first
token, and the mlxrun / mlx-lm ratios (> 1 means mlxrun is faster for tok/s, slower for TTFT).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

DEFAULT_MODEL = Path(__file__).resolve().parent.parent.parent / "shared" / "models" / "pycode-16m"


@dataclass
class Level:
    clients: int
    tokens: int
    wall_s: float
    ttfts: list[float]

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0

    def ttft(self, q: float) -> float:
        data = sorted(self.ttfts)
        return data[min(len(data) - 1, int(q * len(data)))] if data else float("nan")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(name: str, model: str, port: int, log: Path) -> subprocess.Popen:
    if name == "mlxrun":
        cmd = [sys.executable, "-m", "mlxrun.server.cli", model, "--port", str(port)]
    else:
        cmd = [sys.executable, "-m", "mlx_lm.server", "--model", model, "--port", str(port)]
    out = log.open("w")
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())


def _wait_ready(base: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(base + "/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise TimeoutError(base)


async def _one(client: httpx.AsyncClient, base: str, model: str, prompt: str, max_tokens: int):
    """(ttft seconds, generated tokens) of one streamed completion."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    start = time.perf_counter()
    ttft, tokens, pieces = None, 0, 0
    async with client.stream("POST", base + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices") or []:
                if choice.get("text"):
                    pieces += 1
                    if ttft is None:
                        ttft = time.perf_counter() - start
    return (ttft if ttft is not None else time.perf_counter() - start), tokens or pieces


def _prompt(client: int, i: int) -> str:
    return f"# helper {client}.{i}\nimport os\n\n\ndef read_config_{client}_{i}(path):\n"


async def _level(base: str, model: str, clients: int, requests: int, max_tokens: int) -> Level:
    async with httpx.AsyncClient(timeout=600) as client:

        async def worker(c: int) -> list[tuple[float, int]]:
            return [
                await _one(client, base, model, _prompt(c, i), max_tokens) for i in range(requests)
            ]

        start = time.perf_counter()
        results = await asyncio.gather(*(worker(c) for c in range(clients)))
        wall = time.perf_counter() - start
    flat = [r for rs in results for r in rs]
    return Level(clients, sum(t for _, t in flat), wall, [ttft for ttft, _ in flat])


def run_server(name: str, args: argparse.Namespace) -> list[Level]:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = Path(f"/tmp/serve_load_{name}.log")
    proc = _start(name, args.model, port, log)
    try:
        _wait_ready(base, proc)
        # mlx_lm.server calls the model it was started with "default_model".
        model = (
            httpx.get(base + "/v1/models").json()["data"][0]["id"]
            if name == "mlxrun"
            else "default_model"
        )
        asyncio.run(_one(httpx.AsyncClient(timeout=600), base, model, "def warm():\n", 8))
        levels = []
        for n in args.clients:
            level = asyncio.run(_level(base, model, n, args.requests, args.max_tokens))
            print(f"  {name:7s} clients={n:<3d} {level.tok_s:8.1f} tok/s  "
                  f"TTFT p50 {level.ttft(0.5) * 1000:7.0f} ms  p99 {level.ttft(0.99) * 1000:7.0f} ms",
                  flush=True)  # fmt: skip
            levels.append(level)
        return levels
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--requests", type=int, default=2, help="requests per client per level")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    if not Path(args.model).exists():
        sys.exit(f"model not found: {args.model} (pass --model PATH)")
    print(f"model {args.model}, max_tokens {args.max_tokens}, {args.requests} requests per client")
    ours = run_server("mlxrun", args)
    peer = run_server("mlx_lm", args)
    print("\nclients | mlxrun tok/s | mlx-lm tok/s | ratio | TTFT p50 mlxrun / mlx-lm (ms) | "
          "TTFT p99 mlxrun / mlx-lm (ms)")  # fmt: skip
    for a, b in zip(ours, peer, strict=True):
        ratio = a.tok_s / b.tok_s if b.tok_s else float("nan")
        print(f"{a.clients:7d} | {a.tok_s:12.1f} | {b.tok_s:12.1f} | {ratio:5.2f} | "
              f"{a.ttft(0.5) * 1e3:8.0f} / {b.ttft(0.5) * 1e3:8.0f} | "
              f"{a.ttft(0.99) * 1e3:8.0f} / {b.ttft(0.99) * 1e3:8.0f}")  # fmt: skip
    geo = statistics.geometric_mean([a.tok_s / b.tok_s for a, b in zip(ours, peer, strict=True)])
    print(f"\ngeometric-mean tok/s ratio (mlxrun / mlx-lm): {geo:.2f}")


if __name__ == "__main__":
    main()
