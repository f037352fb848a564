"""Peak memory and time of `mlxrun convert` vs `mlx_lm.convert` on the same >= 2 GB bf16 checkpoint.

Builds a random-weight Llama checkpoint (TinyLlama-1.1B shapes by default, sharded like Hub uploads),
converts it to 4-bit g64 with both tools in fresh processes, and prints each one's peak RSS (from
wait4's rusage), wall time, and the ratios the convert issue targets:

    mlxrun peak RSS <= 1.25 x largest source shard + 300 MB
    mlxrun time     <= 1.2 x mlx_lm.convert time

Usage: python benchmarks/convert_memory.py [--workdir DIR] [--layers 22] [--shard-gb 1.0] [--keep]
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

import numpy as np

HIDDEN, INTER, VOCAB, HEADS, KV_HEADS = 2048, 5632, 32000, 32, 4


def _build(path: Path, layers: int, shard_bytes: int) -> None:
    import mlx.core as mx
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path.mkdir(parents=True, exist_ok=True)
    kv = HIDDEN // HEADS * KV_HEADS
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,),
              "lm_head.weight": (VOCAB, HIDDEN)}  # fmt: skip
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.k_proj.weight": (kv, HIDDEN),
            p + "self_attn.v_proj.weight": (kv, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": (INTER, HIDDEN), p + "mlp.up_proj.weight": (INTER, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTER), p + "input_layernorm.weight": (HIDDEN,),
            p + "post_attention_layernorm.weight": (HIDDEN,),
        })  # fmt: skip
    shards: list[dict] = [{}]
    size = 0
    for name, shape in shapes.items():
        n = 2 * int(np.prod(shape))
        if shards[-1] and size + n > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = shape
        size += n
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        arrays = {n: (mx.random.normal(s) * 0.02).astype(mx.bfloat16) for n, s in shard.items()}
        mx.save_safetensors(str(path / fname), arrays, metadata={"format": "pt"})
        weight_map.update({n: fname for n in shard})
        del arrays
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    (path / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": HIDDEN,
        "intermediate_size": INTER, "num_hidden_layers": layers, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": 2048, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
    }))  # fmt: skip
    # A small byte-level BPE so both converters find a tokenizer to copy.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(["def f(x):\n    return x + 1\n"] * 50, trainer)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>",
    }))  # fmt: skip


def build_checkpoint(path: Path, layers: int, shard_bytes: int) -> None:
    """Build in a child process so the builder's memory is gone before measuring."""
    cmd = [sys.executable, __file__, "--build", str(path), "--layers", str(layers),
           "--shard-gb", str(shard_bytes / 1e9)]  # fmt: skip
    subprocess.run(cmd, check=True)


def measure(cmd: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one command, from its own rusage."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        raise SystemExit(f"command failed: {' '.join(cmd)}\n{err[-2000:]}")
    return seconds, usage.ru_maxrss * 1024  # ru_maxrss is KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--shard-gb", type=float, default=1.0)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--build", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build:
        _build(args.build, args.layers, int(args.shard_gb * 1e9))
        return
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mlxrun-convert-bench-"))
    src = work / "source"
    if not (src / "tokenizer.json").exists():
        print(f"building checkpoint in {src} …", flush=True)
        build_checkpoint(src, args.layers, int(args.shard_gb * 1e9))
    shards = sorted(src.glob("*.safetensors"))
    total = sum(f.stat().st_size for f in shards)
    largest = max(f.stat().st_size for f in shards)
    print(
        f"source: {total / 1e9:.2f} GB bf16 in {len(shards)} shards, largest {largest / 1e9:.2f} GB"
    )

    runs = {
        "mlx_lm.convert": [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(src),
                           "--mlx-path", str(work / "out-mlx-lm"), "-q", "--q-bits", "4",
                           "--q-group-size", "64"],
        "mlxrun convert": [sys.executable, "-m", "mlxrun.cli", "convert", str(src), "-o",
                           str(work / "out-mlxrun"), "--bits", "4", "--group-size", "64",
                           "--no-verify", "--quiet"],
    }  # fmt: skip
    results = {}
    for name, cmd in runs.items():
        shutil.rmtree(
            cmd[cmd.index("--mlx-path" if "--mlx-path" in cmd else "-o") + 1], ignore_errors=True
        )
        seconds, rss = measure(cmd)
        results[name] = (seconds, rss)
        print(f"{name:16s} time {seconds:7.1f} s   peak RSS {rss / 1e9:6.2f} GB   "
              f"peak/largest shard {rss / largest:5.2f}")  # fmt: skip

    (t_ours, rss_ours), (t_peer, rss_peer) = results["mlxrun convert"], results["mlx_lm.convert"]
    target = 1.25 * largest + 300e6
    print()
    print(f"peak RSS  mlxrun / mlx_lm.convert: {rss_ours / rss_peer:.2f}")
    print(f"peak RSS  mlxrun vs target (1.25 x largest shard + 300 MB = {target / 1e9:.2f} GB): "
          f"{rss_ours / target:.2f} -> {'PASS' if rss_ours <= target else 'FAIL'}")  # fmt: skip
    print(
        f"time      mlxrun / mlx_lm.convert: {t_ours / t_peer:.2f} "
        f"-> {'PASS' if t_ours <= 1.2 * t_peer else 'FAIL'} (target <= 1.20)"
    )
    print(json.dumps({"largest_shard": largest, "source_bytes": total,
                      "mlxrun": {"seconds": t_ours, "peak_rss": rss_ours},
                      "mlx_lm": {"seconds": t_peer, "peak_rss": rss_peer}}))  # fmt: skip
    if not args.keep and args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
