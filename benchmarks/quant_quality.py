"""Quality of calibrated 4-bit (and other) recipes against the bf16 source, with mlx_lm.convert's
plain q4 g64 (the peer) measured in the same run.

Each recipe is converted in a fresh process (wall time and peak RSS from its own rusage), then
evaluated here in float32 on held-out Python the model never saw in training (its corpus is the
CPython standard library) and that is not in the calibration set: the sources of installed
third-party packages (click, then mlx_lm). Printed per recipe: bits/weight, size, PPL ratio vs the
bf16 source, KL(source ‖ converted) per token, top-1 agreement, convert time, peak RSS.

Usage: python benchmarks/quant_quality.py [--model DIR] [--rows q4,q4-gptq,...] [--eval-tokens N]
Default model: ../shared/models/pycode-16m (see /work/shared/models/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = HERE.parent.parent.parent / "shared" / "models" / "pycode-16m"
if not DEFAULT_MODEL.exists():
    DEFAULT_MODEL = Path("/work/shared/models/pycode-16m")

# name -> convert_model keywords (None: the peer, mlx_lm.convert q4 g64)
ROWS: dict[str, dict | None] = {
    "mlx_lm q4g64": None,
    "q4g64": {"bits": 4, "group_size": 64},
    "q4g64 awq": {"bits": 4, "group_size": 64, "calibrate": "awq"},
    "q4g64 gptq": {"bits": 4, "group_size": 64, "calibrate": "gptq"},
    "q4g64 dwq": {"bits": 4, "group_size": 64, "calibrate": "dwq"},
    "q4g64 auto": {"bits": 4, "group_size": 64, "calibrate": "auto"},
    "mixed_4_6": {"recipe": "mixed_4_6"},
    "mixed_4_6 gptq": {"recipe": "mixed_4_6", "calibrate": "gptq"},
    "q4g32 gptq": {"bits": 4, "group_size": 32, "calibrate": "gptq"},
    "q3g64 gptq": {"bits": 3, "group_size": 64, "calibrate": "gptq"},
}

_CONVERT = """
import json, sys
from mlxrun.convert.api import convert_model
kw = json.loads(sys.argv[3])
convert_model(sys.argv[1], sys.argv[2], quiet=True, force=True, **kw)
"""
_PEER = """
import sys
from mlx_lm import convert
convert(sys.argv[1], mlx_path=sys.argv[2], quantize=True, q_bits=4, q_group_size=64)
"""


def _run(cmd: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one command, from its own rusage."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if status != 0:
        raise RuntimeError(f"{cmd[:3]} failed:\n{err[-3000:]}")
    return time.perf_counter() - t0, usage.ru_maxrss * 1024


def held_out_text(min_chars: int = 400_000) -> str:
    """Python from installed third-party packages: not CPython's stdlib, not our corpus."""
    import click
    import mlx_lm

    parts, size = [], 0
    for pkg in (click, mlx_lm):
        for f in sorted(Path(pkg.__file__).parent.rglob("*.py")):
            text = f.read_text(encoding="utf-8", errors="replace")
            parts.append(text)
            size += len(text)
            if size >= min_chars:
                return "\n".join(parts)
    return "\n".join(parts)


def _eval_tokens(model_dir: Path, n_tokens: int, seq: int):
    import mlx.core as mx
    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(model_dir)
    ids = tok.encode(held_out_text(), add_special_tokens=False)
    rows = max(1, min(len(ids), n_tokens) // seq)
    # Evenly spread windows over the text, so one file does not dominate.
    stride = max(seq, (len(ids) - seq) // rows)
    return mx.array([ids[i * stride : i * stride + seq] for i in range(rows)], dtype=mx.int32)


def _log_probs(model_dir: Path, tokens):
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.utils import dequantize_model

    model, _ = load(str(model_dir))
    # Evaluated dequantized in float32: the same weights (s·q + b), and on the CPU backend far
    # faster than 4-bit kernels or bf16.
    model = dequantize_model(model)
    model.set_dtype(mx.float32)
    out = []
    for i in range(0, tokens.shape[0], 4):
        logits = model(tokens[i : i + 4]).astype(mx.float32)
        lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)  # (B, L, V)
        mx.eval(lp)
        out.append(lp)
    del model
    mx.clear_cache()
    return mx.concatenate(out, axis=0)


def _metrics(ref, lp, tokens) -> dict:
    import math

    import mlx.core as mx

    kl = (mx.exp(ref) * (ref - lp)).sum(-1).mean().item()
    top1 = (ref.argmax(-1) == lp.argmax(-1)).astype(mx.float32).mean().item()
    tgt = tokens[:, 1:, None]
    nll = -mx.take_along_axis(lp[:, :-1], tgt, axis=-1).mean().item()
    return {"kl": max(kl, 0.0), "top1": top1, "ppl": math.exp(nll)}


def _size(d: Path) -> tuple[int, float]:
    size = sum(f.stat().st_size for f in d.glob("*.safetensors"))
    info = d / "mlxrun.json"
    bpw = json.loads(info.read_text())["bits_per_weight"] if info.exists() else float("nan")
    return size, bpw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated row names")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--workdir", type=Path)
    args = ap.parse_args()
    names = [r.strip() for r in args.rows.split(",") if r.strip()]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="quant_quality-"))
    tokens = _eval_tokens(args.model, args.eval_tokens, args.seq)
    ref = _log_probs(args.model, tokens)
    base = _metrics(ref, ref, tokens)
    print(
        f"model {args.model.name}: {tokens.size} held-out tokens, bf16 PPL {base['ppl']:.4f}",
        flush=True,
    )
    src_size = sum(f.stat().st_size for f in args.model.glob("*.safetensors"))
    results = []
    for name in names:
        kw = ROWS[name]
        out = work / name.replace(" ", "-")
        shutil.rmtree(out, ignore_errors=True)
        if kw is None:
            secs, rss = _run([sys.executable, "-c", _PEER, str(args.model), str(out)])
        else:
            kw = {"verify": kw.get("calibrate") == "auto", **kw}
            secs, rss = _run([sys.executable, "-c", _CONVERT, str(args.model), str(out),
                              json.dumps(kw)])  # fmt: skip
        size, bpw = _size(out)
        if bpw != bpw:
            bpw = size * 8 / (src_size / 2)  # bf16 source: 2 bytes per parameter
        m = _metrics(ref, _log_probs(out, tokens), tokens)
        row = {"name": name, "bpw": bpw, "size": size, "ppl_ratio": m["ppl"] / base["ppl"],
               "kl": m["kl"], "top1": m["top1"], "seconds": secs, "rss": rss}  # fmt: skip
        results.append(row)
        print(_fmt(row), flush=True)
    _table(results)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


def _fmt(r: dict) -> str:
    return (
        f"{r['name']:<16}{r['bpw']:>7.3f}{r['size'] / 1e6:>9.2f}MB{r['ppl_ratio']:>9.4f}"
        f"{r['kl']:>9.4f}{r['top1']:>8.1%}{r['seconds']:>8.1f}s{r['rss'] / 1e6:>8.0f}MB"
    )


def _table(results: list[dict]) -> None:
    print()
    print(f"{'recipe':<16}{'bits/w':>7}{'size':>11}{'PPL ratio':>9}{'KL':>9}{'top-1':>8}"
          f"{'time':>9}{'peak RSS':>10}")  # fmt: skip
    for r in results:
        print(_fmt(r))
    peer = next((r for r in results if r["name"] == "mlx_lm q4g64"), None)
    if peer:
        print()
        for r in results:
            print(f"{r['name']:<16} bytes {r['size'] / peer['size']:.3f}x peer, "
                  f"time {r['seconds'] / peer['seconds']:.2f}x peer, "
                  f"PPL {100 * (r['ppl_ratio'] - 1):+.2f}% vs bf16")  # fmt: skip


if __name__ == "__main__":
    main()
