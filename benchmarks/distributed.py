"""Decode tok/s and per-rank peak memory: one process vs two ranks (mlx.launch, ring backend).

Each configuration runs this file as a worker: alone, then under `mlx.launch -n 2 --backend
ring` on 127.0.0.1. Every rank loads the model through mlxrun's loader (only its shard when
distributed), decodes the same greedy tokens on mlxrun's engine (rank 0 drives it, the others
mirror its steps) and reports the decode speed, the bytes of weights it holds and MLX's peak
memory. The one-process run is the peer.

On these Linux machines MLX runs on the CPU and both ranks share one host's cores and memory
bus over loopback TCP: the tok/s figures say nothing about two Macs on Thunderbolt (expect a
slowdown here, where every layer's all_sum crosses the kernel's TCP stack). What carries over is
correctness (the same text) and the per-rank memory: each rank holds about half the weights.

Usage: python benchmarks/distributed.py [MODEL] [--tokens 64] [--prompt-tokens 128]
MODEL defaults to ../shared/models/pycode-16m (relative to the repository).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_MODEL = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "pycode-16m"


def worker(model: str, tokens: int, prompt_tokens: int, parallel: str | None) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlxrun import distributed
    from mlxrun.engine_mirror import run_follower
    from mlxrun.generate import local_engine, stream_request
    from mlxrun.loader import load
    from mlxrun.sampling import SamplingParams

    world = distributed.init_world(parallel)
    lm, tokenizer, _ = load(model, world=world)
    mx.eval(lm.parameters())
    held = sum(p.nbytes for _, p in tree_flatten(lm.parameters()))
    ids = (tokenizer.encode("def fibonacci(n):\n    ") * prompt_tokens)[:prompt_tokens]
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    mx.reset_peak_memory()
    text, first, last, n = "", None, None, 0
    with local_engine(lm, tokenizer, max_running=1, cache_memory_bytes=0) as engine:
        if world is not None and not world.leader:
            run_follower(engine)  # mirrors rank 0's engine steps until it stops
        else:
            for chunk in stream_request(engine, tokenizer, ids, params):
                now = time.perf_counter()
                first = first or now
                last, n, text = now, n + 1, text + chunk.text
    rank = world.rank if world else 0
    mode = distributed.current().parallel if world else "single"
    print(json.dumps({
        "rank": rank, "mode": mode, "tok_s": (n - 1) / (last - first) if n > 1 else None,
        "weights_bytes": held, "peak_bytes": mx.get_peak_memory(), "text": text,
    }), flush=True)  # fmt: skip


def run(argv: list[str], env: dict) -> list[dict]:
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=1800)
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if not rows:
        sys.exit(f"run failed ({done.returncode}): {' '.join(argv)}\n{done.stderr[-2000:]}")
    if done.returncode != 0:  # after the report was printed (e.g. a crash at interpreter exit)
        print(f"note: exit status {done.returncode} after reporting", file=sys.stderr)
    return sorted(rows, key=lambda r: r["rank"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", default=str(DEFAULT_MODEL))
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--parallel", choices=["tensor", "pipeline"], default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.model, args.tokens, args.prompt_tokens, args.parallel)
        return
    from mlxrun.launch import launcher_argv

    me = [sys.executable, __file__, args.model, "--tokens", str(args.tokens),
          "--prompt-tokens", str(args.prompt_tokens), "--worker"]  # fmt: skip
    if args.parallel:
        me += ["--parallel", args.parallel]
    env = {k: v for k, v in os.environ.items() if k not in ("MLX_RANK", "MLX_HOSTFILE")}
    one = run(me, env)
    two = run([*launcher_argv(), "-n", "2", "--backend", "ring", "--", *me], env)
    base = one[0]
    print(f"model {args.model}: {args.prompt_tokens}-token prompt, {args.tokens} greedy tokens")
    print("(MLX CPU backend, both ranks on one host over loopback: tok/s is not a Mac figure)")
    print(f"{'run':<22}{'rank':>5}{'decode tok/s':>14}{'weights held':>14}{'peak memory':>13}")
    for label, rows in (("1 process", one), (f"2 ranks, {two[0]['mode']}", two)):
        for r in rows:  # only rank 0 decodes for the client; the others mirror its steps
            tps = f"{r['tok_s']:.1f}" if r["tok_s"] is not None else "(mirrors)"
            print(f"{label:<22}{r['rank']:>5}{tps:>14}"
                  f"{r['weights_bytes'] / 1e6:>12.1f}MB{r['peak_bytes'] / 1e6:>11.1f}MB")  # fmt: skip
    worst = max(r["peak_bytes"] for r in two)
    print(f"decode tok/s, 2 ranks / 1 process: {two[0]['tok_s'] / base['tok_s']:.2f}x")
    print(f"peak memory per rank / 1 process: {worst / base['peak_bytes']:.2f}x")
    same = os.path.commonprefix([base["text"], two[0]["text"]])
    print(
        f"text agrees with one process for {len(same)} of {len(base['text'])} characters "
        "(bf16 partial sums add up in another order across ranks, so a near-tie can flip)"
    )


if __name__ == "__main__":
    main()
