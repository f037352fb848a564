"""Quantized KV in the running batch (--kv-bits): quality against full precision, and how many
long sessions one KV budget holds at full, 8 and 4 bits, with their decode speed.

1. Quality: greedy decoding of --quality-tokens tokens after a Python-source prompt, full KV vs
   8-bit and 4-bit KV, teacher-forced on the full path (mlxrun.kv_quant.compare_to_full): top-1
   agreement and mean KL(full || quantized).
2. Capacity: a fixed KV budget (--budget-sessions sessions of --session-tokens at full
   precision). For each precision an engine with that budget is asked for as many sessions as
   its scheduler's capacity holds (prompt = session - --gen-tokens, distinct prompts, no prefix
   cache); the peak number running at once is observed, and decode tok/s is measured once every
   session has its first token.
3. With --equal-sessions N: N sessions at every precision and no budget, so decode tok/s
   compares precisions at the same batch size (a tiny model's step is mostly attention).

Full precision is the model's own KV dtype (float32 with --dtype float32, the default on CPU;
bf16 checkpoints on a Mac hold 16-bit KV, where 8-bit saves ~1.9x and 4-bit ~3.6x).

Usage: python benchmarks/kv_quant.py [MODEL] [--quality-tokens 256] [--session-tokens 4096]
       [--budget-sessions 1] [--gen-tokens 16] [--equal-sessions N]
       [--dtype auto|float32|bfloat16|model]
"""

from __future__ import annotations

import argparse
import threading
import time


def _prompts(tokenizer, count: int, length: int) -> list[list[int]]:
    """`count` distinct runs of `length` tokens of Python source (no shared prefixes)."""
    from prefix_cache import _source_ids  # this folder is on sys.path when run as a script

    ids = _source_ids(tokenizer, count * length + 7 * count)
    return [ids[i * (length + 7) : i * (length + 7) + length] for i in range(count)]


def quality(model, prompt: list[int], tokens: int) -> None:
    from mlxrun.kv_quant import KVQuant, compare_to_full

    print(f"\nquality: {tokens} greedy tokens after a {len(prompt)}-token prompt")
    print(f"{'KV':>6} {'top-1 agree':>12} {'mean KL (nats)':>15}")
    for bits in (8, 4):
        top1, kl = compare_to_full(model, prompt, tokens, KVQuant(bits))
        print(f"{bits:>5}b {top1:>12.3f} {kl:>15.2e}")


def _sessions(engine, prompts: list[list[int]], gen: int) -> tuple[int, float, float]:
    """Run the sessions together: (peak running, decode tok/s, seconds)."""
    from mlxrun.engine import Request
    from mlxrun.sampling import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=gen, ignore_eos=True)
    peak, done = [0], threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], engine.stats()["running"])
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    start = time.perf_counter()
    streams = [engine.submit_sync(Request(f"s{i}", p, params)) for i, p in enumerate(prompts)]
    firsts = [next(s) for s in streams]  # every session has its first token
    decode_start = time.perf_counter()
    rest = [list(s) for s in streams]
    end = time.perf_counter()
    done.set()
    watcher.join()
    after_first = sum(len(e.new_token_ids) for r in rest for e in r)
    assert all(len(f.new_token_ids) + sum(len(e.new_token_ids) for e in r) == gen
               for f, r in zip(firsts, rest, strict=True))  # fmt: skip
    return peak[0], after_first / (end - decode_start), end - start


def capacity(model, tokenizer, eos, args) -> None:
    from mlxrun.engine import Engine, EngineConfig

    n, gen = args.session_tokens, args.gen_tokens
    probe = Engine(model, EngineConfig(cache_memory_bytes=0)).start()
    full_per_token = probe.stats()["kv_bytes_per_token"]
    probe.shutdown()
    budget = args.budget_sessions * n * full_per_token
    print(
        f"\ncapacity: KV budget {budget / 2**20:.0f} MiB = {args.budget_sessions} session(s) of "
        f"{n} tokens at full precision; {gen} tokens generated per session"
    )
    print(f"{'KV':>6} {'B/token':>8} {'sessions':>9} {'peak run':>9} {'decode tok/s':>13} "
          f"{'per session':>12} {'wall s':>7}")  # fmt: skip
    for bits in (None, 8, 4):
        config = EngineConfig(
            kv_bits=bits, kv_memory_bytes=budget, cache_memory_bytes=0,
            max_tokens_per_step=2048, eos_token_ids=eos,
        )  # fmt: skip
        with Engine(model, config) as engine:
            stats = engine.stats()
            fit = stats["kv_capacity_tokens"] // n
            prompts = _prompts(tokenizer, fit, n - gen)
            peak, rate, wall = _sessions(engine, prompts, gen)
        name = "full" if bits is None else f"{bits}b"
        print(f"{name:>6} {stats['kv_bytes_per_token']:>8} {fit:>9} {peak:>9} {rate:>13.1f} "
              f"{rate / fit:>12.1f} {wall:>7.1f}")  # fmt: skip


def equal_load(model, tokenizer, eos, args) -> None:
    """The same N sessions at each precision, no budget: what quantization costs per step."""
    from mlxrun.engine import Engine, EngineConfig

    n, gen, count = args.session_tokens, args.gen_tokens, args.equal_sessions
    prompts = _prompts(tokenizer, count, n - gen)
    print(f"\nequal load: {count} sessions of {n} tokens at every precision")
    print(f"{'KV':>6} {'decode tok/s':>13} {'wall s':>7}")
    for bits in (None, 8, 4):
        config = EngineConfig(kv_bits=bits, cache_memory_bytes=0, max_tokens_per_step=2048,
                              eos_token_ids=eos)  # fmt: skip
        with Engine(model, config) as engine:
            _, rate, wall = _sessions(engine, prompts, gen)
        print(f"{'full' if bits is None else f'{bits}b':>6} {rate:>13.1f} {wall:>7.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--quality-tokens", type=int, default=256)
    ap.add_argument("--session-tokens", type=int, default=4096)
    ap.add_argument("--budget-sessions", type=int, default=1)
    ap.add_argument("--gen-tokens", type=int, default=16)
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "model"])
    ap.add_argument("--skip-capacity", action="store_true")
    ap.add_argument("--equal-sessions", type=int, default=0, help="also: N sessions at each")
    args = ap.parse_args()
    args.random_llama = None

    import mlx.core as mx
    from engine_throughput import _load

    model, tokenizer, eos, desc = _load(args)
    print(f"model {desc} on {mx.default_device()}")
    if args.quality_tokens:  # 0: capacity only
        quality(model, _prompts(tokenizer, 1, 64)[0], args.quality_tokens)
    if not args.skip_capacity:
        capacity(model, tokenizer, eos, args)
    if args.equal_sessions:
        equal_load(model, tokenizer, eos, args)


if __name__ == "__main__":
    main()
