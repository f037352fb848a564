"""Speculation inside the batch vs plain decoding, same models, same run (issue 12's numbers).

Workloads (greedy; every speculative output is checked token for token against the plain one):
- edit: a file is answered once plainly (output O), then again with OpenAI's `prediction` = O
  with 5% of its lines changed; tok/s at batch 1 and 8 concurrent.
- draft: free code continuation with pycode-3m drafting for pycode-16m, 1 / 8 / 16 streams
  (adaptive k: the engine stops speculating where it does not pay).
- ngram: prompt lookup on a refactor-like prompt (the file is in the prompt) and on free text.
- peer: mlx-lm's `speculative_generate_step` with the same draft at batch 1 (and its plain
  `generate_step`), on the same prompt as our batch-1 draft figure.

Decode tok/s = generated tokens / time from the first token to the last (all streams together;
the prefill is left out, the same on both sides; the prefix cache is off). mlx-lm's figures are
timed the same way. The CPU backend (these machines) evaluates in float32, as the models' README
asks.

Usage: python benchmarks/speculative.py [--target DIR] [--draft DIR] [--tokens 128] [--k 5]
"""

from __future__ import annotations

import argparse
import inspect
import json
import random
import sys
import time
from pathlib import Path

# The first folder above the repository (a worktree may sit deeper) that has shared/models.
WARM = True  # --cold: time a fresh engine (compiles and the adaptive k's learning included)
SHARED = next(
    (
        p / "shared" / "models"
        for p in Path(__file__).resolve().parents
        if (p / "shared" / "models").is_dir()
    ),
    Path("shared") / "models",
)


def _load(path: Path):
    import mlx.core as mx

    from mlxrun.loader import load

    model, tokenizer, info = load(str(path))
    if mx.default_device() == mx.cpu:
        model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    return model, tokenizer, info


def _sources(n: int, lines: int) -> list[str]:
    """n chunks of real Python source (stdlib), `lines` lines each."""
    import argparse as a
    import ast
    import json as j
    import textwrap

    text = "".join(inspect.getsource(m) for m in (textwrap, a, ast, j.decoder, inspect))
    rows = [r for r in text.splitlines() if r.strip()]
    step = len(rows) // (n + 1)
    return ["\n".join(rows[i * step : i * step + lines]) + "\n" for i in range(n)]


def _run(lm, prompts, spec, tokens, predictions=None):
    """All prompts at once in a fresh engine, each stream read on its own thread:
    (outputs, decode seconds, last event per request, engine stats). Decode seconds run from
    the first request's first token to the last token (the prefill is left out: on the CPU
    backend it would hide the decode, the part speculation changes)."""
    from concurrent.futures import ThreadPoolExecutor

    from mlxrun.engine import Engine, EngineConfig, Request
    from mlxrun.sampling import SamplingParams
    from mlxrun.spec_step import SpecConfig

    model, _, info = lm
    params = SamplingParams(temperature=0, max_tokens=tokens)
    cfg = EngineConfig(
        eos_token_ids=info.eos_token_ids, cache_memory_bytes=0, max_running=16,
        speculate=spec if spec is not None else SpecConfig(), context_length=info.context_length,
    )  # fmt: skip

    def read(stream):
        events, times = [], []
        for e in stream:
            events.append(e)
            if e.new_token_ids:
                times.append(time.perf_counter())
        return events, times

    with Engine(model, cfg).start() as engine:
        engine.generate_sync(Request("warm", [1, 2, 3], params.replace(max_tokens=4)))
        if WARM:  # the same workload once, untimed: kernels compiled, adaptive k settled
            warm = [
                engine.submit_sync(
                    Request(f"w{i}", p, params, prediction=predictions[i] if predictions else None)
                )
                for i, p in enumerate(prompts)
            ]
            for s in warm:
                list(s)
        streams = [
            engine.submit_sync(
                Request(f"r{i}", p, params, prediction=predictions[i] if predictions else None)
            )
            for i, p in enumerate(prompts)
        ]
        with ThreadPoolExecutor(len(streams)) as pool:
            results = list(pool.map(read, streams))
        stats = engine.stats()
    outs = [[t for e in ev for t in e.new_token_ids] for ev, _ in results]
    first = min(ts[0] for _, ts in results if ts)
    last = max(ts[-1] for _, ts in results if ts)
    return outs, last - first, [ev[-1] for ev, _ in results], stats


def _rate(outs, seconds) -> float:
    return (sum(len(o) for o in outs) - 1) / seconds


def _compare(name, lm, prompts, tokens, spec, predictions=None, rows=None):
    plain, t0, _, _ = _run(lm, prompts, None, tokens)
    fast, t1, last, stats = _run(lm, prompts, spec, tokens, predictions)
    ratio = _rate(fast, t1) / _rate(plain, t0)
    row = {
        "workload": name, "streams": len(prompts), "plain_tok_s": round(_rate(plain, t0), 1),
        "spec_tok_s": round(_rate(fast, t1), 1), "ratio": round(ratio, 2),
        "identical": fast == plain, "acceptance": round(stats["spec_acceptance_rate"], 3),
        "tokens_per_step": round(stats["spec_tokens_per_row_step"], 2),
    }  # fmt: skip
    if predictions:
        row["accepted_prediction_tokens"] = sum(e.accepted_prediction_tokens for e in last)
        row["rejected_prediction_tokens"] = sum(e.rejected_prediction_tokens for e in last)
    print(json.dumps(row), flush=True)
    if rows is not None:
        rows.append(row)
    return plain


def _edit_lines(text: str, share: float, seed: int) -> str:
    """The text with `share` of its lines changed (at least one)."""
    lines = text.split("\n")
    rng = random.Random(seed)
    picked = rng.sample(range(len(lines)), max(1, round(len(lines) * share)))
    for i in picked:
        lines[i] = lines[i] + "  # changed" if lines[i].strip() else "pass"
    return "\n".join(lines)


def edit_workload(lm, tokens, k, rows):
    from mlxrun.spec_step import SpecConfig

    tok = lm[1]
    files = _sources(8, 16)
    prompts = [tok.encode(f"# file: module_{i}.py\n{f}") for i, f in enumerate(files)]
    plain, _, _, _ = _run(lm, prompts, None, tokens)
    predicted = [
        tok.encode(_edit_lines(tok.decode(o), 0.05, i), add_special_tokens=False)
        for i, o in enumerate(plain)
    ]
    spec = SpecConfig(max_k=k * 2)  # a prediction is cheap to propose: let k grow further
    for n in (1, 8):
        _compare("edit (prediction, 5% lines changed)", lm, prompts[:n], tokens, spec,
                 predicted[:n], rows)  # fmt: skip


def draft_workload(lm, draft, tokens, k, rows):
    from mlxrun.spec_step import SpecConfig

    tok = lm[1]
    files = _sources(16, 8)
    prompts = [tok.encode(f) for f in files]
    spec = SpecConfig(max_k=k, draft=draft)
    for n in (1, 8, 16):
        _compare("draft (pycode-3m), free continuation", lm, prompts[:n], tokens, spec, None, rows)
    return prompts[0]


def ngram_workload(lm, tokens, k, rows):
    from mlxrun.spec_step import SpecConfig

    tok = lm[1]
    spec = SpecConfig(mode="ngram", max_k=k)
    files = _sources(2, 16)
    refactor = [
        tok.encode(
            f"# original.py\n{f}\n# refactored.py (same code, clearer names)\n"
            + f.split("\n")[0]
            + "\n"
        )  # fmt: skip
        for f in files
    ]
    _compare("ngram, refactor prompt", lm, refactor[:1], tokens, spec, None, rows)
    prose = tok.encode(
        "The history of the city begins with a small settlement on the river, where traders "
        "from the north met farmers from the valley. Over the centuries"
    )
    _compare("ngram, free text", lm, [prose], tokens, spec, None, rows)


def mlx_lm_peer(lm, draft_lm, prompt, tokens, k, ours_tok_s, rows):
    import mlx.core as mx
    from mlx_lm.generate import generate_step, speculative_generate_step

    def timed(gen):
        out, first = [], None
        for token, *_ in gen:
            out.append(int(token))
            first = first or time.perf_counter()
            if len(out) >= tokens:
                break
        return out, time.perf_counter() - first

    ids = mx.array(prompt)
    greedy = lambda x: mx.argmax(x, axis=-1)  # noqa: E731
    plain, t0 = timed(generate_step(ids, lm[0], max_tokens=tokens, sampler=greedy))
    spec, t1 = timed(
        speculative_generate_step(ids, lm[0], draft_lm[0], num_draft_tokens=k,
                                  max_tokens=tokens, sampler=greedy)
    )  # fmt: skip
    row = {
        "workload": "mlx-lm speculative_generate_step (peer), batch 1",
        "mlx_lm_plain_tok_s": round((len(plain) - 1) / t0, 1),
        "mlx_lm_spec_tok_s": round((len(spec) - 1) / t1, 1),
        "ours_draft_b1_tok_s": ours_tok_s,
        "ours_vs_peer": round(ours_tok_s / ((len(spec) - 1) / t1), 2),
        "peer_identical_to_its_plain": spec == plain,
    }  # fmt: skip
    print(json.dumps(row), flush=True)
    rows.append(row)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", type=Path, default=SHARED / "pycode-16m")
    ap.add_argument("--draft", type=Path, default=SHARED / "pycode-3m")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--only", choices=("edit", "draft", "ngram"), default=None)
    ap.add_argument("--cold", action="store_true", help="no untimed warm-up round")
    args = ap.parse_args()
    global WARM
    WARM = not args.cold
    for p in (args.target, args.draft):
        if not p.exists():
            sys.exit(f"{p} does not exist; pass --target / --draft")
    from mlxrun.draft import Draft, check_same_tokenizer

    lm, draft_lm = _load(args.target), _load(args.draft)
    check_same_tokenizer(lm[1], draft_lm[1], str(args.draft))
    rows: list[dict] = []
    if args.only in (None, "edit"):
        edit_workload(lm, args.tokens * 2, args.k, rows)
    if args.only in (None, "draft"):
        prompt = draft_workload(lm, Draft(draft_lm[0]), args.tokens, args.k, rows)
        b1 = next(r for r in rows if r["workload"].startswith("draft") and r["streams"] == 1)
        mlx_lm_peer(lm, draft_lm, prompt, args.tokens, args.k, b1["spec_tok_s"], rows)
    if args.only in (None, "ngram"):
        ngram_workload(lm, args.tokens, args.k, rows)
    print(json.dumps({"all_identical": all(r.get("identical", True) for r in rows)}))


if __name__ == "__main__":
    main()
