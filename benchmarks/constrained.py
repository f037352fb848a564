"""What enforcing a JSON schema costs: aggregate decode throughput of N constrained requests vs the
same N requests unconstrained, same engine, same run (alternating, median of --repeats).

Constrained rows need the token sampled in the previous step before their mask can be computed,
so a batch with one loses the overlap of sampling with the next forward pass; the mask itself is
computed by llguidance on the CPU. mlx-lm has no constrained decoding to compare with, so the
peer is our own unconstrained engine; the mlx-lm comparison of that engine is
benchmarks/engine_throughput.py.

The schema asks for {"code": "<string>"} so the model can write freely for --tokens tokens
(EOS ignored): the cost measured is per token, not a shorter answer.

Usage: python benchmarks/constrained.py [MODEL] [--levels 1 8] [--tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_throughput import DEFAULT_MODEL, _prompts  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {"code": {"type": "string"}},
    "required": ["code"],
    "additionalProperties": False,
}


def _run(engine, prompts, params, compiler) -> float:
    from mlxrun.engine import Request

    requests = [
        Request(
            f"r{i}-{time.monotonic_ns()}",
            p,
            params,
            constraint=None if compiler is None else compiler.json_schema(SCHEMA, "schema"),
        )
        for i, p in enumerate(prompts)
    ]
    start = time.perf_counter()
    streams = [engine.submit_sync(r) for r in requests]
    tokens = sum(len(e.new_token_ids) for s in streams for e in s)
    return tokens / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=str(DEFAULT_MODEL))
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import mlx.core as mx

    from mlxrun.constrain import GrammarCompiler
    from mlxrun.engine import Engine, EngineConfig
    from mlxrun.loader import load
    from mlxrun.sampling import SamplingParams

    model, tokenizer, info = load(args.model)
    if mx.default_device() == mx.cpu:
        model.set_dtype(mx.float32)  # bf16 matmuls are several times slower on the CPU backend
    mx.eval(model.parameters())
    compiler = GrammarCompiler(tokenizer)
    params = SamplingParams(temperature=0.8, seed=0, max_tokens=args.tokens, ignore_eos=True)
    config = EngineConfig(eos_token_ids=tuple(info.eos_token_ids), cache_memory_bytes=0)
    print(f"model {info.name}, {args.tokens} tokens per request, median of {args.repeats}")
    print(f"{'streams':>7} {'schema tok/s':>13} {'free tok/s':>11} {'schema / free':>14}")
    with Engine(model, config).start() as engine:
        _run(engine, _prompts(tokenizer, 1, args.prompt_tokens), params, compiler)  # warm-up
        for n in args.levels:
            prompts = _prompts(tokenizer, n, args.prompt_tokens)
            ours, free = [], []
            for _ in range(args.repeats):
                ours.append(_run(engine, prompts, params, compiler))
                free.append(_run(engine, prompts, params, None))
            a, b = statistics.median(ours), statistics.median(free)
            print(f"{n:>7} {a:>13.1f} {b:>11.1f} {a / b:>14.2f}")


if __name__ == "__main__":
    main()
