"""Model switching: a chat model and an autocomplete model used alternately (Continue's setup),
`mlxrun serve CHAT AUTOCOMPLETE` against `mlx_lm.server`, which holds one model and reloads on
every switch.

    python benchmarks/model_switch.py [--chat ../shared/models/pycode-16m]
                                      [--autocomplete ../shared/models/pycode-3m] [--rounds 10]

Each server runs alone (one after the other). One round is a chat request to the chat model, then
a completion request (code to continue) to the autocomplete model, both greedy, max_tokens 16.
The first round warms both models up and is not counted. Reported: median and p90 latency per
request kind and for all requests, and the mlx_lm / mlxrun ratio (> 1: mlxrun is faster).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "models"
CHAT = [{"role": "user", "content": "Write a Python function that reverses a string."}]
CODE = "def fibonacci(n):\n    if n < 2:\n        return n\n    return "


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(name: str, chat: str, auto: str, port: int, log: Path) -> subprocess.Popen:
    if name == "mlxrun":
        cmd = [sys.executable, "-m", "mlxrun", "serve", chat, auto, "--port", str(port),
               "--context", "2048", "--keep-alive", "-1", "-q"]  # fmt: skip
    else:
        cmd = [sys.executable, "-m", "mlx_lm.server", "--model", chat, "--port", str(port)]
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env=os.environ.copy())  # fmt: skip


def _wait(base: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(base + "/v1/models", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(base)


def _request(client: httpx.Client, base: str, kind: str, model: str) -> float:
    start = time.perf_counter()
    if kind == "chat":
        body = {"model": model, "messages": CHAT, "max_tokens": 16, "temperature": 0}
        r = client.post(base + "/v1/chat/completions", json=body)
    else:
        body = {"model": model, "prompt": CODE, "max_tokens": 16, "temperature": 0}
        r = client.post(base + "/v1/completions", json=body)
    r.raise_for_status()
    return time.perf_counter() - start


def _run(name: str, chat: str, auto: str, rounds: int, logs: Path) -> dict[str, list[float]]:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    proc = _start(name, chat, auto, port, logs / f"{name}.log")
    # mlxrun knows each model by its directory's name; mlx_lm.server loads the path it is sent.
    models = {"chat": Path(chat).name, "auto": Path(auto).name} if name == "mlxrun" else \
        {"chat": chat, "auto": auto}  # fmt: skip
    times: dict[str, list[float]] = {"chat": [], "auto": []}
    try:
        _wait(base, proc)
        with httpx.Client(timeout=600) as client:
            for i in range(rounds + 1):
                for kind in ("chat", "auto"):
                    took = _request(client, base, kind, models[kind])
                    if i:  # round 0 warms both up
                        times[kind].append(took)
    finally:
        proc.terminate()
        proc.wait(30)
    return times


def _p(data: list[float], q: float) -> float:
    data = sorted(data)
    return data[min(len(data) - 1, int(q * len(data)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chat", default=str(SHARED / "pycode-16m"))
    parser.add_argument("--autocomplete", default=str(SHARED / "pycode-3m"))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--logs", default="/tmp/model_switch_logs")
    args = parser.parse_args()
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    results = {n: _run(n, args.chat, args.autocomplete, args.rounds, logs)
               for n in ("mlxrun", "mlx_lm")}  # fmt: skip
    print(f"{args.rounds} rounds of chat ({Path(args.chat).name}) then autocomplete "
          f"({Path(args.autocomplete).name}), max_tokens 16, after one warm-up round")  # fmt: skip
    print(f"{'':22}{'mlxrun':>18}{'mlx_lm.server':>18}{'ratio':>8}")
    for kind, label in (("chat", "chat"), ("auto", "autocomplete"), ("all", "all")):
        row = []
        for name in ("mlxrun", "mlx_lm"):
            t = results[name]
            data = t["chat"] + t["auto"] if kind == "all" else t[kind]
            row.append((statistics.median(data), _p(data, 0.9)))
        ratio = row[1][0] / row[0][0]
        cells = "".join(f"{m * 1000:9.0f} /{p * 1000:6.0f}" for m, p in row)
        print(f"{label + ' p50 / p90 ms':22}{cells}{ratio:7.1f}x")


if __name__ == "__main__":
    main()
