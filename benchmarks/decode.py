"""Decode tok/s of mlxrun's engine (what generate runs on) vs mlx_lm.generate.stream_generate, same model, same run.

Both load the same 4-bit MLX model, get the same prompt (Python source, tokenized) and decode the
same number of greedy tokens with EOS masked on both sides (so neither stops early). Each prompt is
prefilled once per loop into a KV cache that every timed run continues from (trimmed back after
each), so the runs measure decoding at that context length and not the prefill. Decode speed is
timed identically for both: (tokens - 1) / (time of last token - time of first token), the median
of --repeats runs, alternating the two loops to share the noise.

Usage: python benchmarks/decode.py [MODEL] [--prompt-lengths 128 4096] [--tokens 64] [--repeats 3]

MODEL is an MLX model directory, or a Hub checkpoint that is converted to 4-bit in a temp dir;
default: ../shared/models/pycode-16m (relative to the repository) when it exists.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

DEFAULT_MODEL = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "pycode-16m"
PREFILL_STEP = 2048  # the same chunk size for both, so only the loops differ


def _model_dir(arg: str | None, tmp: Path) -> Path:
    from mlxrun import hub
    from mlxrun.convert.api import convert_model

    src = Path(arg) if arg else DEFAULT_MODEL
    if not arg and not src.exists():
        sys.exit(f"no model given and {DEFAULT_MODEL} does not exist; pass a model path")
    if hub.is_mlx_model(src):
        return src
    out = tmp / "q4"
    print(f"converting {src} to 4-bit in {out} ...", file=sys.stderr)
    convert_model(str(src), out, bits=4, verify=False, quiet=True)
    return out


def _prompt_ids(tokenizer, n: int) -> list[int]:
    """n tokens of real Python source (stdlib modules, concatenated until long enough)."""
    import ast
    import json

    text = ""
    for mod in (inspect, argparse, json.decoder, ast):
        text += inspect.getsource(mod)
    ids = tokenizer.encode(text)
    while len(ids) < n:
        ids += ids
    return ids[:n]


def _decode_tps(stream: Iterable) -> float:
    """Tokens per second between the first and the last token of a stream."""
    first = last = None
    n = 0
    for _ in stream:
        last = time.perf_counter()
        if first is None:
            first = last
        n += 1
    return (n - 1) / (last - first)


def _ours(model, tokenizer, eos: list[int], ids: list[int]) -> Callable[[int], Iterable]:
    """Our engine (generate and chat run on it), alone: after the first run its prefix cache holds
    all prompt ids but the last one, so each timed run computes only that id again."""
    from mlxrun.engine import Engine
    from mlxrun.generate import engine_config, generate_stream
    from mlxrun.sampling import SamplingParams

    config = engine_config(
        tokenizer, "bench", None, max_running=1, max_tokens_per_step=PREFILL_STEP
    )
    engine = Engine(model, config).start()  # a daemon thread: it ends with the process
    bias = {e: -100.0 for e in eos}

    def run(n: int) -> Iterable:
        params = SamplingParams(temperature=0, max_tokens=n, logit_bias=bias, ignore_eos=True)
        return generate_stream(model, tokenizer, ids, params, engine=engine)

    _decode_tps(run(2))  # prefill once
    return run


def _mlx_lm(model, tokenizer, eos: list[int], ids: list[int]) -> Callable[[int], Iterable]:
    """mlx-lm's loop, from the same cache state, trimmed back after each run."""
    import mlx.core as mx
    from mlx_lm.generate import stream_generate
    from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    cache = make_prompt_cache(model)
    for i in range(0, len(ids) - 1, PREFILL_STEP):
        model(mx.array([ids[i : min(i + PREFILL_STEP, len(ids) - 1)]]), cache=cache)
        mx.eval([c.state for c in cache])

    def run(n: int) -> Iterable:
        trim_prompt_cache(cache, cache[0].offset - (len(ids) - 1))
        return stream_generate(
            model,
            tokenizer,
            ids[-1:],
            max_tokens=n,
            sampler=make_sampler(temp=0.0),
            logits_processors=make_logits_processors(logit_bias={e: -100.0 for e in eos}),
            prompt_cache=cache,
        )

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--prompt-lengths", type=int, nargs="+", default=[128, 4096])
    ap.add_argument("--tokens", type=int, default=64, help="tokens decoded per run")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    import mlx.core as mx
    from mlx_lm import load as mlx_lm_load

    from mlxrun.loader import load

    with tempfile.TemporaryDirectory(prefix="mlxrun-decode-") as tmp:
        path = _model_dir(args.model, Path(tmp))
        model, tokenizer, info = load(str(path), force=True)
        their_model, their_tokenizer = mlx_lm_load(str(path))
        # Float32 for the non-quantized parts: bf16 is several times slower on MLX's CPU backend.
        if mx.default_device() == mx.cpu:
            model.set_dtype(mx.float32)
            their_model.set_dtype(mx.float32)
        eos = sorted(tokenizer.eos_token_ids)
        print(f"model {path.name} ({info.quantization}, {info.architecture}), device "
              f"{mx.default_device()}, {args.tokens} tokens per run, median of {args.repeats}")  # fmt: skip
        print(f"{'prompt':>7} {'mlxrun tok/s':>13} {'mlx-lm tok/s':>13} {'ours/mlx-lm':>12}")
        for n in args.prompt_lengths:
            ids = _prompt_ids(tokenizer, n)
            # Each prompt is prefilled once per loop; every timed run decodes from that state.
            loops = {
                "mlxrun": _ours(model, tokenizer, eos, ids),
                "mlx-lm": _mlx_lm(their_model, their_tokenizer, eos, ids),
            }
            tps: dict[str, list[float]] = {name: [] for name in loops}
            for run in loops.values():
                _decode_tps(run(8))  # warm-up
            for _ in range(args.repeats):
                for name, run in loops.items():
                    tps[name].append(_decode_tps(run(args.tokens)))
            ours, theirs = (statistics.median(tps[k]) for k in ("mlxrun", "mlx-lm"))
            print(f"{n:>7} {ours:>13.1f} {theirs:>13.1f} {ours / theirs:>12.3f}", flush=True)


if __name__ == "__main__":
    main()
