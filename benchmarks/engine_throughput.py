"""Aggregate decode throughput of mlxrun's engine vs mlx-lm's BatchGenerator, same model, same run.

At each concurrency level N, N requests (different prompts of real Python source) each generate
--tokens greedy tokens with EOS ignored, through our Engine and through mlx-lm's BatchGenerator.
Two aggregate figures per side: end to end (N x tokens / wall time from submitting the requests
to the last token, prompt processing included) and decode only (tokens produced after every
request has its first token, over that window: the steady N-row batch). Each is the median of
--repeats runs, the two sides alternating so they share the machine's noise. Printed per level:
ours, mlx-lm's, ours / mlx-lm, and our N-stream figure / our first level's.

Usage: python benchmarks/engine_throughput.py [MODEL] [--levels 1 4 8 16] [--tokens 64]
       [--prompt-tokens 64] [--repeats 3] [--dtype auto|float32|bfloat16|model]
       [--random-llama LAYERS:HIDDEN] [--harness async|sync]

MODEL: a model directory or store name; default ../shared/models/pycode-16m (relative to the
repository) when it exists. `auto` runs non-quantized weights as float32 on the CPU backend (bf16
is several times slower there) and as stored on a GPU. --random-llama uses random bf16 weights
of that shape instead (for accelerators: nothing to carry).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import time
from pathlib import Path

DEFAULT_MODEL = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "pycode-16m"


def _prompts(tokenizer, n: int, length: int) -> list[list[int]]:
    """n different prompts of `length` tokens: real Python source (stdlib modules), or random
    ids when there is no tokenizer (a random-weight model)."""
    import argparse as a
    import ast
    import inspect
    import json
    import random

    if tokenizer is None:
        rng = random.Random(0)
        return [[rng.randrange(100, 30000) for _ in range(length)] for _ in range(n)]
    text = "".join(inspect.getsource(m) for m in (inspect, a, json.decoder, ast))
    ids = tokenizer.encode(text)
    while len(ids) < n * length:
        ids += ids
    return [ids[i * length : (i + 1) * length] for i in range(n)]


def random_llama(layers: int, hidden: int):
    """A Llama-shaped model with random bf16 weights (heads of 128, 8 KV heads, MLP 3.5x,
    vocabulary 32k): accelerator figures without carrying weights around."""
    import mlx.core as mx
    from mlx_lm.models import llama

    heads = max(hidden // 128, 1)
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=int(hidden * 3.5) // 256 * 256,
        num_attention_heads=heads,
        num_key_value_heads=min(8, heads),
        rms_norm_eps=1e-5,
        vocab_size=32000,
    )
    model = llama.Model(args)
    model.set_dtype(mx.bfloat16)
    mx.eval(model.parameters())
    return model


def _load(args):
    """(model, tokenizer or None, eos ids, description)."""
    import mlx.core as mx

    if args.random_llama:
        layers, hidden = (int(x) for x in args.random_llama.split(":"))
        return random_llama(layers, hidden), None, (), f"random llama {layers}x{hidden} (bf16)"
    from mlxrun.loader import load

    if args.model is None and not DEFAULT_MODEL.exists():
        sys.exit(f"no model given and {DEFAULT_MODEL} does not exist; pass a model path")
    model, tokenizer, info = load(args.model or str(DEFAULT_MODEL), force=True)
    dtype = args.dtype
    if dtype == "auto":  # bf16 is several times slower than float32 on MLX's CPU backend
        dtype = "float32" if mx.default_device() == mx.cpu else "model"
    if dtype != "model":
        model.set_dtype(getattr(mx, dtype))  # quantized weights are unaffected
    mx.eval(model.parameters())
    running = info.quantization if dtype == "model" else dtype
    desc = f"{Path(info.path).name} ({info.quantization} stored, running {running})"
    return model, tokenizer, info.eos_token_ids, desc


def _rates(stamps: list[list[float]], start: float, end: float) -> tuple[float, float]:
    """(end-to-end tok/s, decode tok/s). Decode counts the tokens after every request has its
    first token (all N rows decoding) over that window."""
    total = sum(len(s) for s in stamps)
    all_in = max(s[0] for s in stamps)
    late = sum(1 for s in stamps for t in s if t > all_in)
    return total / (end - start), late / max(end - all_in, 1e-9)


def _ours(engine, prompts: list[list[int]], tokens: int) -> tuple[float, float]:
    from mlxrun.engine import Request
    from mlxrun.sampling import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)

    async def run() -> tuple[float, float]:
        async def one(i: int, prompt: list[int]) -> list[float]:
            out = []
            async for event in engine.submit(Request(f"r{i}", prompt, params)):
                out += [time.perf_counter()] * len(event.new_token_ids)
            return out

        start = time.perf_counter()
        stamps = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        assert all(len(s) == tokens for s in stamps)
        return _rates(list(stamps), start, time.perf_counter())

    return asyncio.run(run())


def _ours_sync(engine, prompts: list[list[int]], tokens: int) -> tuple[float, float]:
    """As `_ours`, consumed on this thread without asyncio: it wakes only for the last request's
    events (the engine's cost without per-token delivery to a consumer thread). Decode-only
    uses the engine's step numbers: every row emits once per step."""
    from mlxrun.engine import Request
    from mlxrun.sampling import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    start = time.perf_counter()
    streams = [engine.submit_sync(Request(f"r{i}", p, params)) for i, p in enumerate(prompts)]
    first = next(streams[-1])  # the last admitted: every row is decoding from here on
    all_in = time.perf_counter()
    events = [first, *streams[-1]]
    end = time.perf_counter()
    events += [e for s in streams[:-1] for e in s]
    total = sum(len(e.new_token_ids) for e in events)
    late = sum(len(e.new_token_ids) for e in events if e.step > first.step)
    assert total == len(prompts) * tokens, total
    return total / (end - start), late / max(end - all_in, 1e-9)


def _mlx_lm(model, prompts: list[list[int]], tokens: int) -> tuple[float, float]:
    from mlx_lm.generate import BatchGenerator

    n = len(prompts)
    start = time.perf_counter()
    gen = BatchGenerator(
        model, max_tokens=tokens, completion_batch_size=max(n, 1), prefill_batch_size=n
    )
    uids = gen.insert(prompts, max_tokens=[tokens] * n)
    stamps: dict[int, list[float]] = {u: [] for u in uids}
    while responses := gen.next_generated():
        now = time.perf_counter()
        for r in responses:
            stamps[r.uid].append(now)
    end = time.perf_counter()
    gen.close()
    assert all(len(s) == tokens for s in stamps.values())
    return _rates(list(stamps.values()), start, end)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--tokens", type=int, default=64, help="tokens generated per request")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "model"])
    ap.add_argument("--random-llama", metavar="LAYERS:HIDDEN", help="e.g. 32:4096 (8B shapes)")
    ap.add_argument(
        "--harness",
        default="async",
        choices=["async", "sync"],
        help="how our events are consumed: asyncio streams (a server) or one blocking reader",
    )
    args = ap.parse_args()
    ours_run = _ours if args.harness == "async" else _ours_sync
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("mlxrun.batch").setLevel(logging.INFO)  # how batching was set up

    import mlx.core as mx

    from mlxrun.engine import Engine, EngineConfig

    model, tokenizer, eos, desc = _load(args)
    # One model object for both: the same weights, the same kernels.
    config = EngineConfig(max_running=max(args.levels), cache_memory_bytes=0, eos_token_ids=eos)
    print(
        f"model {desc}, device {mx.default_device()}, {args.prompt_tokens}-token prompts, "
        f"{args.tokens} tokens per request, median of {args.repeats}, {args.harness} harness"
    )
    print("tok/s: end to end (prompt processing included) | decode only (all streams decoding)")
    print(
        f"{'streams':>7} {'mlxrun':>8} {'mlx-lm':>8} {'ratio':>6} {'vs 1':>6} |"
        f" {'mlxrun':>8} {'mlx-lm':>8} {'ratio':>6} {'vs 1':>6}"
    )
    with Engine(model, config) as engine:
        warm = _prompts(tokenizer, 2, args.prompt_tokens)
        ours_run(engine, warm, 4)
        _mlx_lm(model, warm, 4)
        base: tuple[float, float] | None = None
        for n in args.levels:
            prompts = _prompts(tokenizer, n, args.prompt_tokens)
            ours_run(
                engine, prompts, 2
            )  # this batch size's kernels (compiled on first use on GPUs)
            _mlx_lm(model, prompts, 2)
            ours, theirs = [], []
            for _ in range(args.repeats):
                ours.append(ours_run(engine, prompts, args.tokens))
                theirs.append(_mlx_lm(model, prompts, args.tokens))
            row = []
            for k in (0, 1):
                a = statistics.median(r[k] for r in ours)
                b = statistics.median(r[k] for r in theirs)
                row.append((a, b))
            base = base or (row[0][0], row[1][0])
            cells = [
                f"{a:>8.1f} {b:>8.1f} {a / b:>6.2f} {a / base[k]:>6.2f}"
                for k, (a, b) in enumerate(row)
            ]
            print(f"{n:>7} {cells[0]} | {cells[1]}", flush=True)


if __name__ == "__main__":
    main()
