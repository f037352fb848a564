"""Logit error vs transformers for checkpoints saved by transformers 5: mlxrun.load vs mlx_lm.load.

Each case is a tiny random-weight fixture written by the installed transformers' save_pretrained
(5.x writes `rope_parameters`/`dtype` where mlx-lm reads `rope_theta`/`rope_scaling`), with a
rope_theta other than the mlx-lm class's default and optionally a RoPE scaling type. Both loaders
read the same directory in the same run; the figure is max |ours - transformers| / max |transformers|
over the logits of a 32-token prompt, transformers in float32 on PyTorch CPU.

Usage (from the repository root): python benchmarks/config_formats.py [ARCH:SCALING ...]
e.g. qwen2:none llama:yarn phi3:longrope; default: every fixture architecture, no scaling.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

PROMPT = list(range(5, 37))


def _relative_error(model, expected) -> float:
    import mlx.core as mx
    import numpy as np

    ours = np.array(model(mx.array([PROMPT]))[0].astype(mx.float32))  # (L, V)
    return float(np.abs(ours - expected).max() / np.abs(expected).max())


def _measure(load, path: Path, expected) -> str:
    try:
        return f"{_relative_error(load(str(path))[0], expected):.1e}"
    except Exception as e:  # the peer may not load the checkpoint at all
        return f"{type(e).__name__}"


def main(cases: list[str]) -> None:
    import torch
    from mlx_lm import load as mlx_lm_load
    from transformers import AutoModelForCausalLM

    from fixtures.builder import ARCHS, build_checkpoint
    from mlxrun.loader import load as mlxrun_load

    cases = cases or [f"{arch}:none" for arch in ARCHS]
    print(f"{'checkpoint':<20} {'mlx_lm.load':>12} {'mlxrun.load':>12}")
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            arch, scaling = case.split(":")
            path = build_checkpoint(Path(tmp) / case.replace(":", "-"), arch, rope_scaling=scaling)
            ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            with torch.no_grad():
                expected = ref(torch.tensor([PROMPT])).logits[0].numpy()
            peer = _measure(mlx_lm_load, path, expected)
            ours = _measure(mlxrun_load, path, expected)
            print(f"{case:<20} {peer:>12} {ours:>12}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
