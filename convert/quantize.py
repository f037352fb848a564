"""Streaming quantization: source shards -> MLX shards, one tensor resident at a time.

The source is opened lazily (`mx.load` maps nothing until a tensor is evaluated), the architecture's
own `sanitize` renames/stacks tensors on the lazy arrays, and every output tensor is described before
any is computed. Then each tensor is evaluated, written and dropped.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import mlx.core as mx
from mlx.utils import tree_flatten

from mlxrun.convert.checkpoint import SourceCheckpoint
from mlxrun.convert.recipes import QuantParams
from mlxrun.convert.writer import DEFAULT_MAX_SHARD_BYTES, Entry, ShardedWriter
from mlxrun.errors import CorruptCheckpointError
from mlxrun.models import sanitize

if TYPE_CHECKING:
    from mlxrun.models import ModelProtocol

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}

# One output tensor: its name, how to compute it, and how many source bytes it accounts for.
Job = tuple[list[Entry], Callable[[], list[mx.array]], int]


@dataclass(frozen=True)
class WriteResult:
    index: dict
    num_tensors: int
    total_bytes: int


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def load_lazy(ckpt: SourceCheckpoint, model: ModelProtocol) -> dict[str, mx.array]:
    """All source tensors as lazy arrays, passed through the architecture's sanitize."""
    raw: dict[str, mx.array] = {}
    for file in ckpt.shard_files:
        try:
            raw.update(cast("dict[str, mx.array]", mx.load(str(file))))  # safetensors: a dict
        except (RuntimeError, ValueError) as e:
            raise CorruptCheckpointError(f"cannot read {file.name}: {e}") from None
    return sanitize(model, raw)


def check_against_model(weights: dict[str, mx.array], model: ModelProtocol) -> None:
    """Names and shapes must be exactly what the architecture expects (shapes are known lazily)."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights), key=_natural_key)
    if missing:
        raise CorruptCheckpointError(
            f"the checkpoint lacks tensor {missing[0]!r}"
            + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
        )
    extra = sorted(set(weights) - set(expected), key=_natural_key)
    if extra:
        raise CorruptCheckpointError(
            f"the checkpoint has tensor {extra[0]!r} that this architecture does not use"
            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""),
            hint="The config.json may not match the weights; check the model_type.",
        )
    for name, want in expected.items():
        if tuple(weights[name].shape) != tuple(want.shape):
            raise CorruptCheckpointError(
                f"tensor {name!r} has shape {tuple(weights[name].shape)}, "
                f"config.json implies {tuple(want.shape)}"
            )


def target_dtype(config: dict, requested: str | None) -> mx.Dtype | None:
    """--dtype, else the checkpoint's declared dtype, else keep each tensor's own."""
    name = requested or config.get("torch_dtype") or config.get("dtype")
    if name is None and isinstance(config.get("text_config"), dict):
        name = config["text_config"].get("dtype") or config["text_config"].get("torch_dtype")
    return DTYPES.get(str(name)) if name else None


def make_jobs(
    weights: dict[str, mx.array],
    qmap: dict[str, QuantParams],
    dtype: mx.Dtype | None,
    cast_predicate: Callable[[str], bool],
    overrides: dict[str, mx.array] | None = None,
) -> list[Job]:
    """Describe every output tensor; consumes `weights` so evaluated sources can be freed.

    `overrides` (calibrated tensors, convert/calibrate.py) replace a source tensor's values: a
    float tensor is then cast and quantized as the source would be; a `.weight/.scales/.biases`
    triple is written as it is.
    """
    overrides = {} if overrides is None else overrides
    jobs: list[Job] = []
    for name in sorted(weights, key=_natural_key):
        w = weights[name]
        src_bytes = w.nbytes
        path, _, leaf = name.rpartition(".")
        params = qmap.get(path) if leaf == "weight" else None
        if params is not None and f"{path}.scales" in overrides:
            names = [f"{path}.weight", f"{path}.scales", f"{path}.biases"]
            outs = [overrides.pop(n) for n in names]
        else:
            outs, names = _outputs(name, overrides.pop(name, w), params, dtype, cast_predicate)
        entries = [Entry(n, a.dtype, tuple(a.shape)) for n, a in zip(names, outs, strict=True)]
        jobs.append((entries, _producer(outs), src_bytes))
    weights.clear()
    return jobs


def target_dtype_for(name: str, src: mx.Dtype, dtype: mx.Dtype | None, cast_predicate) -> mx.Dtype:
    """The dtype tensor `name` (or its scales and biases) is written in."""
    if dtype is not None and mx.issubdtype(src, mx.floating) and cast_predicate(name):
        return dtype
    return src


def _outputs(name, w, params, dtype, cast_predicate) -> tuple[list[mx.array], list[str]]:
    w = w.astype(target_dtype_for(name, w.dtype, dtype, cast_predicate))
    if params is None:
        return [w], [name]
    path = name.rpartition(".")[0]
    q = mx.quantize(w, group_size=params.group_size, bits=params.bits)
    return list(q[:3]), [f"{path}.weight", f"{path}.scales", f"{path}.biases"]


def _producer(outs: list[mx.array]) -> Callable[[], list[mx.array]]:
    # Hand the lazy arrays over exactly once, so the job list holds no evaluated data afterwards.
    box = [outs]

    def take() -> list[mx.array]:
        arrays, box[0] = box[0], []
        return arrays

    return take


def write_jobs(
    jobs: list[Job],
    out_dir: Path,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    on_progress: Callable[[int, int], None] | None = None,
) -> WriteResult:
    """Evaluate and write each job in order; `on_progress(source_bytes, tensors)` after each."""
    entries = [e for job in jobs for e in job[0]]
    writer = ShardedWriter(out_dir, entries, max_shard_bytes)
    try:
        for i in range(len(jobs)):
            job_entries, take, src_bytes = jobs[i]
            jobs[i] = (job_entries, _producer([]), src_bytes)
            arrays = take()
            mx.eval(*arrays)
            for e, a in zip(job_entries, arrays, strict=True):
                writer.write(e.name, a)
            del arrays
            mx.clear_cache()  # keep freed buffers from piling up in MLX's cache
            if on_progress:
                on_progress(src_bytes, len(job_entries))
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return WriteResult(writer.index(), len(entries), writer.total_bytes)
