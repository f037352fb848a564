"""The prefix cache's disk tier (v2: hash-chained segments, writer thread) against v1 (one file
per evicted path, written on the engine thread), same model, same machine, same run.

1. Sharing: bytes on disk after one conversation (a 2K-token system prompt + its own 64-token
   turn, 32 generated tokens) against two sibling conversations sharing the system prompt.
   Target: two <= 1.3x one.
2. Restart: a new engine on the two-conversation directory (memory tier empty); each sibling's
   next turn must hit the disk tier (cached tokens, TTFT).
3. Decode while the tier writes: a long stream decodes while short requests (distinct 512-token
   prompts) come and go; each leaving evicts another's KV from a small memory tier into the disk
   tier. The long stream's mean step time (token to token) while they run, tier on / tier off,
   median of --repeats alternating runs. Target <= 1.1x.

The peer (v1) is the same script run in a subprocess on `git archive --peer-rev -- mlxrun` (the
commit before v2 by default), so both use their own engine and tier.

Usage: python benchmarks/disk_tier.py [MODEL] [--dtype auto|float32|bfloat16|model]
       [--repeats 3] [--peer-rev REV] [--no-peer]
MODEL defaults to ../shared/models/pycode-16m (float32 on CPU, as engine_throughput.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PEER_REV = "76fabc9"  # the last commit with v1 (mlxrun/cache.py DiskCache)


def _config(desc: str, eos, cache_dir: str | None, **kw):
    from mlxrun.engine import EngineConfig

    return EngineConfig(cache_dir=cache_dir, namespace=desc, eos_token_ids=eos,
                        max_tokens_per_step=2048, **kw)  # fmt: skip


def _params(n: int):
    from mlxrun.sampling import SamplingParams

    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def _run(engine, rid: str, ids: list[int], n: int) -> tuple[list[int], float, int]:
    """(generated tokens, TTFT s, cached tokens)."""
    from mlxrun.engine import Request

    start, ttft, out, cached = time.perf_counter(), 0.0, [], 0
    for event in engine.submit_sync(Request(rid, ids, _params(n))):
        if not out and event.new_token_ids:
            ttft, cached = time.perf_counter() - start, event.cached_tokens
        out += event.new_token_ids
    return out, ttft, cached


def _disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*.safetensors"))


def sharing_and_restart(model, eos, desc, ids: list[int], root: Path) -> dict:
    from mlxrun.engine import Engine

    system, users = ids[:2048], [ids[2048:2112], ids[2112:2176]]
    convs = [system + u for u in users]
    with Engine(model, _config(desc, eos, str(root / "one"))) as engine:
        _run(engine, "a", convs[0], 32)
    with Engine(model, _config(desc, eos, str(root / "two"))) as engine:
        replies = [_run(engine, f"c{i}", c, 32)[0] for i, c in enumerate(convs)]
    one, two = _disk_bytes(root / "one"), _disk_bytes(root / "two")
    out = {"one_bytes": one, "two_bytes": two, "ratio": two / one}
    with Engine(model, _config(desc, eos, str(root / "two"))) as engine:
        for i, conv in enumerate(convs):
            follow = conv + replies[i] + ids[2176 + 16 * i : 2192 + 16 * i]
            _, ttft, cached = _run(engine, f"f{i}", follow, 1)
            out[f"hit{i}"] = cached / len(conv + replies[i])  # share of the stored path
            out[f"ttft{i}"] = ttft
        out["disk_hits"] = engine.stats()["disk_hits"]
    return out


def decode_while_writing(model, eos, desc, ids: list[int], root: Path | None) -> float:
    """Mean token-to-token time of a long stream while short requests evict into the tier."""
    from mlxrun.engine import Engine, Request

    per_token = _kv_per_token(model)
    config = _config(desc, eos, None if root is None else str(root),
                     cache_memory_bytes=1200 * per_token)  # fmt: skip
    with Engine(model, config) as engine:
        times: list[float] = []

        def consume() -> None:
            for event in engine.submit_sync(Request("long", ids[:64], _params(2000))):
                times.extend(time.perf_counter() for _ in event.new_token_ids)

        thread = threading.Thread(target=consume)
        thread.start()
        while len(times) < 8:
            time.sleep(0.002)
        start = time.perf_counter()
        for i in range(10):
            _run(engine, f"s{i}", ids[100 + 512 * i : 612 + 512 * i], 4)
        end = time.perf_counter()
        engine.abort("long")
        thread.join()
    inside = [t for t in times if start <= t <= end]
    if times[-1] <= end:
        raise RuntimeError("the long stream ended before the short requests: raise max_tokens")
    return (inside[-1] - inside[0]) / (len(inside) - 1)


def _kv_per_token(model) -> int:
    import mlx.core as mx

    from mlxrun import models
    from mlxrun.cache import kv_bytes_per_token

    cache = models.make_cache(model)
    mx.eval(model(mx.array([[1]]), cache=cache))
    return kv_bytes_per_token(cache)


def measure(args) -> dict:
    sys.path.insert(0, str(HERE))
    from engine_throughput import _load
    from prefix_cache import _source_ids

    model, tokenizer, eos, desc = _load(args)
    ids = _source_ids(tokenizer, 6000)
    with tempfile.TemporaryDirectory(prefix="mlxrun-disk-bench-") as tmp:
        out = sharing_and_restart(model, eos, desc, ids, Path(tmp) / "share")
        ratios = []
        for r in range(args.repeats):
            off = decode_while_writing(model, eos, desc, ids, None)
            on = decode_while_writing(model, eos, desc, ids, Path(tmp) / f"decode{r}")
            ratios.append(on / off)
        out.update(decode_ratio=statistics.median(ratios), decode_ratios=ratios, desc=desc)
    return out


def _peer(args) -> dict:
    """This script on v1's mlxrun (from git), in a subprocess."""
    with tempfile.TemporaryDirectory(prefix="mlxrun-peer-") as tree:
        archive = Path(tree) / "mlxrun.tar"
        subprocess.run(["git", "-C", str(HERE.parent), "archive", "-o", str(archive),
                        args.peer_rev, "mlxrun"], check=True)  # fmt: skip
        with tarfile.open(archive) as tar:
            tar.extractall(tree, filter="data")
        cmd = [sys.executable, __file__, "--as-peer", "--repeats", str(args.repeats),
               "--dtype", args.dtype, *([args.model] if args.model else [])]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": tree}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"peer run failed:\n{proc.stderr[-3000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "model"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--peer-rev", default=PEER_REV)
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--as-peer", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--random-llama", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.as_peer:
        print(json.dumps(measure(args)))
        return
    ours = measure(args)
    peer = None if args.no_peer else _peer(args)
    print(f"model {ours['desc']}; decode ratio: median of {args.repeats}")
    rows = [
        ("disk bytes, one conversation", "one_bytes", "{:,.0f}", ""),
        ("disk bytes, two siblings", "two_bytes", "{:,.0f}", ""),
        ("two / one", "ratio", "{:.3f}", "<= 1.3"),
        ("restart: share of path hit, A", "hit0", "{:.3f}", "> 0.9"),
        ("restart: share of path hit, B", "hit1", "{:.3f}", "> 0.9"),
        ("restart: TTFT A s", "ttft0", "{:.3f}", ""),
        ("restart: TTFT B s", "ttft1", "{:.3f}", ""),
        ("decode step, tier on / off", "decode_ratio", "{:.3f}", "<= 1.1"),
    ]
    print(f"{'':>32} {'v2 (ours)':>14} {'v1 (peer)':>14} {'target':>8}")
    for label, key, fmt, target in rows:
        theirs = fmt.format(peer[key]) if peer else "-"
        print(f"{label:>32} {fmt.format(ours[key]):>14} {theirs:>14} {target:>8}")
    print(f"decode ratios, each run: ours {ours['decode_ratios']}"
          + (f", peer {peer['decode_ratios']}" if peer else ""))  # fmt: skip


if __name__ == "__main__":
    main()
