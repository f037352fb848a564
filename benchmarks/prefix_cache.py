"""Time to first token with a cached 4,096-token prefix (memory tier, then disk tier after a
restart) against the same request cold, same model, same run.

1. Cold: a fresh engine (disk tier on, empty directory) gets prefix + suffix A.
2. Memory tier: the same engine gets prefix + suffix B: the prefix comes from the radix cache.
3. Disk tier: the engine shuts down (writing its prefixes to disk); a new Engine on the same
   directory gets prefix + suffix C: the prefix is loaded from disk.

Suffixes differ so only the prefix can hit. TTFT = submit -> first token event. Warm figures are
medians of --repeats (each with a new suffix; disk runs each on a fresh engine). Targets: memory
tier <= 5% of cold, disk tier <= 25% of cold.

Usage: python benchmarks/prefix_cache.py [MODEL] [--prefix-tokens 4096] [--suffix-tokens 32]
       [--repeats 3] [--dtype auto|float32|bfloat16|model] [--random-llama LAYERS:HIDDEN]

MODEL, --dtype and --random-llama as in engine_throughput.py.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time


def _source_ids(tokenizer, n: int) -> list[int]:
    """n tokens of Python source (random ids without a tokenizer: a random-weight model)."""
    import argparse as a
    import ast
    import inspect
    import json
    import random

    if tokenizer is None:
        rng = random.Random(0)
        return [rng.randrange(100, 30000) for _ in range(n)]
    text = "".join(inspect.getsource(m) for m in (inspect, a, json.decoder, ast))
    ids = tokenizer.encode(text)
    while len(ids) < n:
        ids += ids
    return ids[:n]


def _ttft(engine, rid: str, ids: list[int]) -> tuple[float, int]:
    """(seconds to the first token, cached tokens reported)."""
    from mlxrun.engine import Request
    from mlxrun.sampling import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    start = time.perf_counter()
    stream = engine.submit_sync(Request(rid, ids, params))
    first = next(stream)
    elapsed = time.perf_counter() - start
    list(stream)
    return elapsed, first.cached_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--prefix-tokens", type=int, default=4096)
    ap.add_argument("--suffix-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "model"])
    ap.add_argument("--random-llama", metavar="LAYERS:HIDDEN", help="e.g. 32:4096 (8B shapes)")
    args = ap.parse_args()

    import mlx.core as mx
    from engine_throughput import _load  # this folder is on sys.path when run as a script

    from mlxrun.engine import Engine, EngineConfig

    model, tokenizer, eos, desc = _load(args)

    n, k = args.prefix_tokens, args.suffix_tokens
    ids = _source_ids(tokenizer, n + k * (2 + 2 * args.repeats))
    prefix = ids[:n]
    suffixes = iter(ids[n + i * k : n + (i + 1) * k] for i in range(2 + 2 * args.repeats))
    print(
        f"model {desc} on {mx.default_device()}, {n}-token prefix + "
        f"{k}-token suffix, warm figures: median of {args.repeats}"
    )
    with tempfile.TemporaryDirectory(prefix="mlxrun-prefix-") as cache_dir:
        config = EngineConfig(
            cache_dir=cache_dir,
            namespace=desc,
            max_tokens_per_step=2048,
            eos_token_ids=eos,
        )
        with Engine(model, config) as engine:
            _ttft(engine, "warm-up", next(suffixes))  # kernels, not the prefix
            cold, cached = _ttft(engine, "cold", prefix + next(suffixes))
            assert cached == 0, cached
            memory = []
            for i in range(args.repeats):
                t, cached = _ttft(engine, f"mem{i}", prefix + next(suffixes))
                assert cached >= n, cached
                memory.append(t)
        disk = []
        for i in range(args.repeats):
            with Engine(model, config) as engine:  # a restart: only the disk tier holds it
                t, cached = _ttft(engine, f"disk{i}", prefix + next(suffixes))
                assert cached >= n and engine.stats()["disk_hits"] == 1, cached
                disk.append(t)
    mem, dsk = statistics.median(memory), statistics.median(disk)
    print(f"{'':>12} {'TTFT s':>9} {'vs cold':>8} {'target':>7}")
    print(f"{'cold':>12} {cold:>9.3f} {1:>8.3f}")
    print(f"{'memory tier':>12} {mem:>9.3f} {mem / cold:>8.3f} {0.05:>7.2f}")
    print(f"{'disk tier':>12} {dsk:>9.3f} {dsk / cold:>8.3f} {0.25:>7.2f}")


if __name__ == "__main__":
    main()
