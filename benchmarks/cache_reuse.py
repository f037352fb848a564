"""KV reuse beyond the prefix (--cache-reuse) against plain prefix caching, same model, same run.

A 4,096-token prompt of Python source is sent once (filling the prefix cache), then again with
64 tokens inserted at 25%. Plain prefix caching reuses the 1,008 tokens before the insertion and
prefills everything after it; --cache-reuse also reuses the 3,000-odd tokens after it, re-rotated
to their new positions, and prefills only the insertion (and the last token).

Reported per engine: tokens prefilled for the edited prompt, its TTFT (submit -> first token,
median of --repeats, each on a fresh engine), tokens cached / reused. Quality: chunk reuse is an
approximation (the reused tokens' KV saw the text before the edit, not after), so the edited
request's first-token top-20 logprobs are compared with plain prefix caching's (exact: a full
prefill past the prefix), and the greedy continuations are compared token by token.

Usage: python benchmarks/cache_reuse.py [MODEL] [--tokens 4096] [--insert 64] [--at 0.25]
       [--min-run 256] [--repeats 3] [--dtype auto|float32|bfloat16|model]
       [--random-llama LAYERS:HIDDEN]

MODEL defaults to ../shared/models/pycode-16m (float32 on CPU), as in engine_throughput.py.
"""

from __future__ import annotations

import argparse
import statistics
import time

GEN = 16  # greedy tokens compared between the two engines


def _source_ids(tokenizer, n: int, skip: int = 0) -> list[int]:
    """n tokens of Python source from `skip` on (random ids without a tokenizer)."""
    import ast
    import inspect
    import json
    import random
    import textwrap

    if tokenizer is None:
        rng = random.Random(skip)
        return [rng.randrange(100, 30000) for _ in range(n)]
    text = "".join(inspect.getsource(m) for m in (inspect, argparse, json.decoder, ast, textwrap))
    ids = tokenizer.encode(text)
    while len(ids) < n + skip:
        ids += ids
    return ids[skip : skip + n]


def _run(engine, rid: str, ids: list[int]) -> dict:
    from mlxrun.engine import Request
    from mlxrun.sampling import SamplingParams

    params = SamplingParams(
        temperature=0, max_tokens=GEN, ignore_eos=True, logprobs=True, top_logprobs=20
    )
    before = engine.stats()["prompt_tokens"]
    start = time.perf_counter()
    stream = engine.submit_sync(Request(rid, ids, params))
    first = next(stream)
    ttft = time.perf_counter() - start
    events = [first, *stream]
    return {
        "ttft": ttft,
        "prefilled": engine.stats()["prompt_tokens"] - before,
        "cached": first.cached_tokens,
        "reused": first.reused_chunk_tokens,
        "top": dict(first.logprobs[0].top),
        "tokens": [t for e in events for t in e.new_token_ids],
    }


def _trial(model, eos, desc, reuse: int, base: list[int], edited: list[int]) -> dict:
    from mlxrun.engine import Engine, EngineConfig

    config = EngineConfig(
        namespace=desc, max_tokens_per_step=2048, eos_token_ids=eos, cache_reuse=reuse
    )
    with Engine(model, config) as engine:
        _run(engine, "warm-up", edited[-64:])  # kernels, not the prompt
        _run(engine, "base", base)
        return _run(engine, "edited", edited)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--tokens", type=int, default=4096, help="edited prompt length")
    ap.add_argument("--insert", type=int, default=64)
    ap.add_argument("--at", type=float, default=0.25)
    ap.add_argument("--min-run", type=int, default=256, help="--cache-reuse N")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "model"])
    ap.add_argument("--random-llama", metavar="LAYERS:HIDDEN", help="e.g. 32:4096 (8B shapes)")
    args = ap.parse_args()

    import mlx.core as mx
    from engine_throughput import _load  # this folder is on sys.path when run as a script

    model, tokenizer, eos, desc = _load(args)
    n = args.tokens - args.insert
    base = _source_ids(tokenizer, n)
    inserted = _source_ids(tokenizer, args.insert, skip=n + 500)  # text from elsewhere
    at = int(n * args.at)
    edited = base[:at] + inserted + base[at:]
    print(
        f"model {desc} on {mx.default_device()}: {n}-token prompt, then {args.insert} tokens "
        f"inserted at {at}; --cache-reuse {args.min_run}; TTFT median of {args.repeats}"
    )
    runs = {name: [] for name in ("prefix", "reuse")}
    for _ in range(args.repeats):  # alternate, so drift on a shared machine hits both alike
        runs["prefix"].append(_trial(model, eos, desc, 0, base, edited))
        runs["reuse"].append(_trial(model, eos, desc, args.min_run, base, edited))
    plain = statistics.median(r["ttft"] for r in runs["prefix"])
    print(f"{'':>16} {'prefilled':>9} {'cached':>7} {'reused':>7} {'TTFT s':>8} {'vs prefix':>9}")
    for name, label in (("prefix", "prefix cache"), ("reuse", "+ cache reuse")):
        r, t = runs[name][-1], statistics.median(x["ttft"] for x in runs[name])
        print(
            f"{label:>16} {r['prefilled']:>9} {r['cached']:>7} {r['reused']:>7} "
            f"{t:>8.3f} {t / plain:>9.3f}"
        )
    exact, approx = runs["prefix"][-1], runs["reuse"][-1]
    gap = max(abs(lp - exact["top"][i]) for i, lp in approx["top"].items() if i in exact["top"])
    agree = next(
        (
            k
            for k, (a, b) in enumerate(zip(exact["tokens"], approx["tokens"], strict=True))
            if a != b
        ),
        GEN,
    )
    shared = len(set(exact["top"]) & set(approx["top"]))
    print(
        f"quality vs exact: first-token top-20 logprob gap {gap:.4f} nats ({shared}/20 ids "
        f"shared); greedy tokens identical for {agree}/{GEN}"
    )


if __name__ == "__main__":
    main()
