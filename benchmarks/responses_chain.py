"""A 10-turn agent conversation over the Responses API: previous_response_id against resending the
whole history each turn (what a stateless client does), same server code, same run.

Each turn's input is a block of --message-tokens tokens of real Python source (as a tool's
output would be), the reply is greedy and at most --reply-tokens tokens, and the instructions are
the same every turn. Three conversations, each on its own server (none reads another's cache),
run in lockstep (turn k of each, then turn k+1) so that they share the machine's noise:

- chain:    `previous_response_id` + only the new input (store true: the prompt is pinned).
- resend:   `store: false` and the whole history as input items each turn (prefix cache on).
- no-cache: as resend, on a server with the prefix cache off (`--cache-memory 0`): what a
            server that keeps nothing between requests prefills.

Reported per turn: prompt tokens, prefilled tokens (input_tokens - cached_tokens, from the
server's usage) and TTFT (request sent -> the first output item, which the server opens at the
first non-blank text; measured by the client over loopback, streaming). The last turn's figures and the no-cache / chain TTFT ratio are the
summary.

Usage: python benchmarks/responses_chain.py [MODEL] [--turns 10] [--message-tokens 128]
       [--reply-tokens 32]

MODEL: a model directory; default ../shared/models/pycode-16m (relative to the repository). On
MLX's CPU backend the weights are cast to float32.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

DEFAULT_MODEL = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "pycode-16m"
INSTRUCTIONS = "You are a coding agent. Read the tool output and continue the work."


@contextlib.contextmanager
def serve(lm, cache_bytes: int | None) -> Iterator[str]:
    """A fresh engine + app on a loopback port (the weights are shared between servers)."""
    import uvicorn

    from mlxrun.engine import Engine, EngineConfig
    from mlxrun.server.app import ServerConfig, create_app

    model, tokenizer, info = lm
    config = EngineConfig(
        eos_token_ids=tuple(sorted(tokenizer.eos_token_ids)), namespace=info.name,
        context_length=info.context_length,
        **({} if cache_bytes is None else {"cache_memory_bytes": cache_bytes}),
    )  # fmt: skip
    app = create_app(Engine(model, config), ServerConfig(info.name, info.context_length),
                     tokenizer=tokenizer)  # fmt: skip
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    while not server.started or httpx.get(url + "/health").status_code != 200:
        time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def _messages(tokenizer, turns: int, n: int) -> list[str]:
    """`turns` blocks of n tokens each: consecutive slices of real Python source."""
    import argparse as source_a
    import json.decoder as source_b

    text = inspect.getsource(source_b) + inspect.getsource(source_a)
    ids = tokenizer.encode(text, add_special_tokens=False)
    return [tokenizer.decode(ids[i * n : (i + 1) * n]) for i in range(turns)]


def _turn(http: httpx.Client, url: str, body: dict) -> tuple[float, dict]:
    """Streams one response: (TTFT, the final response object)."""
    start, ttft, final = time.perf_counter(), None, None
    with http.stream("POST", url + "/v1/responses", json={**body, "stream": True}) as r:
        if r.status_code != 200:
            sys.exit(f"HTTP {r.status_code}: {r.read().decode()}")
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if ttft is None and event["type"] in ("response.output_item.added",):
                ttft = time.perf_counter() - start
            if event["type"] in ("response.completed", "response.incomplete", "response.failed"):
                final = event["response"]
    assert final is not None and final["status"] != "failed", final
    return ttft if ttft is not None else time.perf_counter() - start, final


def _text(response: dict) -> str:
    return "".join(
        p.get("text", "")
        for o in response["output"]
        if o["type"] == "message"
        for p in o["content"]
    )


def conversation(
    url: str, model: str, blocks: list[str], reply: int, chain: bool
) -> Iterator[dict]:
    """One row per turn, yielded as each turn ends (so modes can run in lockstep)."""
    history: list[dict] = []
    previous = None
    with httpx.Client(timeout=600) as http:
        for text in blocks:
            item = {"role": "user", "content": text}
            body = {"model": model, "instructions": INSTRUCTIONS, "temperature": 0,
                    "max_output_tokens": reply}  # fmt: skip
            if chain:
                body.update(input=[item], previous_response_id=previous)
            else:
                body.update(input=[*history, item], store=False)
            ttft, final = _turn(http, url, body)
            previous = final["id"]
            history += [item, *final["output"]]
            usage = final["usage"]
            cached = usage["input_tokens_details"]["cached_tokens"]
            yield {"prompt": usage["input_tokens"], "prefilled": usage["input_tokens"] - cached,
                   "ttft_ms": ttft * 1000, "text": _text(final)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", nargs="?", default=str(DEFAULT_MODEL))
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--message-tokens", type=int, default=128)
    p.add_argument("--reply-tokens", type=int, default=32)
    args = p.parse_args()

    import mlx.core as mx

    from mlxrun.loader import load

    model, tokenizer, info = load(args.model)
    if mx.default_device() == mx.cpu:
        model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    lm = (model, tokenizer, info)
    blocks = _messages(tokenizer, args.turns, args.message_tokens)
    modes = (("chain", True, None), ("resend", False, None), ("no-cache", False, 0))
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in modes}
    with contextlib.ExitStack() as stack:
        talks = {}
        for name, chain, cache in modes:
            url = stack.enter_context(serve(lm, cache))
            warm = {"model": info.name, "input": "warm up", "max_output_tokens": 2, "store": False}
            _turn(httpx.Client(timeout=600), url, warm)
            talks[name] = conversation(url, info.name, blocks, args.reply_tokens, chain)
        for _ in blocks:  # in lockstep: turn k of every mode at about the same moment
            for name, talk in talks.items():
                runs[name].append(next(talk))
    same = all(r["text"] == runs["chain"][i]["text"] for rows in runs.values()
               for i, r in enumerate(rows))  # fmt: skip
    print(
        f"model {info.name}, {args.turns} turns, {args.message_tokens}-token inputs, "
        f"replies <= {args.reply_tokens} tokens; identical replies in all modes: {same}"
    )
    print(f"{'turn':>4}  " + "  ".join(f"{n + ' prompt/prefill/TTFT ms':>34}" for n in runs))
    for t in range(args.turns):
        cells = [f"{rows[t]['prompt']:>10} {rows[t]['prefilled']:>9} {rows[t]['ttft_ms']:>11.1f}"
                 for rows in runs.values()]  # fmt: skip
        print(f"{t + 1:>4}  " + "  ".join(f"{c:>34}" for c in cells))
    last = {n: rows[-1] for n, rows in runs.items()}
    print(
        f"\nturn {args.turns}: prefilled tokens chain {last['chain']['prefilled']}, resend "
        f"{last['resend']['prefilled']}, no-cache {last['no-cache']['prefilled']}; TTFT ms chain "
        f"{last['chain']['ttft_ms']:.1f}, resend {last['resend']['ttft_ms']:.1f}, no-cache "
        f"{last['no-cache']['ttft_ms']:.1f}"
    )
    ratio = last["no-cache"]["ttft_ms"] / last["chain"]["ttft_ms"]
    print(
        f"TTFT ratio no-cache / chain at turn {args.turns}: {ratio:.2f}x; resend / chain: "
        f"{last['resend']['ttft_ms'] / last['chain']['ttft_ms']:.2f}x"
    )


if __name__ == "__main__":
    main()
