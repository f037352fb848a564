"""Split a lazily built model across the ranks of a World, before any weight is read.

Tensor parallel uses the architecture's mlx-lm `shard(group)` (every layer's projections split
by heads / hidden units, all_sum after the row-parallel ones); pipeline parallel its
`model.pipeline(group)` (each rank keeps a run of layers; rank 0 gets the last ones). Weights
come from `mx.load`, which maps tensors lazily, so slicing them in `shard()` and dropping the
other ranks' layers happens before anything is materialised: `mx.eval(model.parameters())`
then reads only this rank's share.
"""

from __future__ import annotations

import math
import re
from typing import Any

from mlxrun.distributed import PARALLEL_MODES, World
from mlxrun.errors import UnsupportedModelError

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def supported_modes(model: Any) -> tuple[str, ...]:
    """Which of PARALLEL_MODES this model's mlx-lm class implements."""
    modes = []
    if callable(getattr(model, "shard", None)):
        modes.append("tensor")
    inner = getattr(model, "model", None)
    if callable(getattr(inner, "pipeline", None)):
        modes.append("pipeline")
    return tuple(modes)


def resolve_mode(model: Any, requested: str, architecture: str) -> str:
    """The mode to use ("auto": tensor if it can, else pipeline); UnsupportedModelError naming
    the architecture when its class has neither, or not the one asked for."""
    modes = supported_modes(model)
    if requested == "auto" and modes:
        return modes[0]
    if requested in modes:
        return requested
    have = f"it supports only {' and '.join(modes)}" if modes else "it supports neither"
    wanted = f"{requested} parallel" if requested != "auto" else "tensor or pipeline parallel"
    raise UnsupportedModelError(
        f"architecture {architecture!r} cannot run across machines with {wanted}: mlx-lm's "
        f"{architecture} model has no {'shard()' if requested == 'tensor' else 'pipeline()'}"
        f" ({have})",
        hint=(f"Pass --parallel {modes[0]}." if modes else
              "Run it on one machine, or pick a model whose mlx-lm class has shard()/pipeline()."),
    )  # fmt: skip


def check_divisible(config: dict, size: int) -> None:
    """Tensor parallel splits attention heads and MLP units evenly: refuse sizes that do not."""
    from mlxrun.memory import text_config

    cfg = text_config(config)
    names = ("num_attention_heads", "num_key_value_heads", "intermediate_size")
    for name in names:
        value = cfg.get(name)
        if isinstance(value, int) and value % size:
            raise UnsupportedModelError(
                f"tensor parallel over {size} ranks needs {name} ({value}) divisible by {size}",
                hint="Use a rank count that divides it, or --parallel pipeline.",
            )


def layer_of(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def pipeline_span(num_layers: int, rank: int, size: int) -> tuple[int, int]:
    """[start, end) of the layers `rank` runs, as mlx-lm's PipelineMixin splits them (even
    split, low ranks take the extra layers, rank 0 runs the last ones)."""
    base, extra = divmod(num_layers, size)
    split = [base + (1 if r < extra else 0) for r in range(size)]
    start = sum(split[rank + 1 :])
    return start, start + split[rank]


def before_weights(model: Any, world: World) -> None:
    """Pipeline: cut the layer list before weights attach (tensor parallel shards after)."""
    if world.parallel == "pipeline":
        model.model.pipeline(world.group)


def local_weights(model: Any, world: World, weights: dict) -> dict:
    """The tensors this rank keeps: pipeline ranks drop the other ranks' layers unread."""
    if world.parallel != "pipeline":
        return weights
    start, end = model.model.start_idx, model.model.end_idx
    return {k: v for k, v in weights.items() if (i := layer_of(k)) is None or start <= i < end}


def after_weights(model: Any, world: World) -> None:
    """Tensor parallel: slice every projection for this rank, then materialise the share."""
    import mlx.core as mx

    if world.parallel == "tensor":
        model.shard(world.group)
    mx.eval(model.parameters())


def share_bytes(tensor_bytes: dict[str, int], num_layers: int, size: int, mode: str) -> int:
    """Weight bytes on the busiest rank: in tensor parallel each layer's matrices split `size`
    ways (norms, embeddings and the head stay whole); in pipeline parallel a rank holds its run of
    layers plus the embeddings, final norm and head."""
    if size <= 1:
        return sum(tensor_bytes.values())
    if mode == "tensor":
        total = 0
        for name, n in tensor_bytes.items():
            split = layer_of(name) is not None and "norm" not in name.rsplit(".", 2)[-2]
            total += math.ceil(n / size) if split else n
        return total
    if mode not in PARALLEL_MODES:
        raise ValueError(f"unknown mode {mode!r}")
    shared = sum(n for k, n in tensor_bytes.items() if layer_of(k) is None)
    spans = [pipeline_span(num_layers, r, size) for r in range(size)]
    return shared + max(
        sum(n for k, n in tensor_bytes.items() if (i := layer_of(k)) is not None and a <= i < b)
        for a, b in spans
    )


def plan_world(path: Any, config: dict, world: World) -> World:
    """`world` with its mode settled for this model (checked on a lazily built copy, so an
    unsupported architecture fails before any weight file is opened); becomes current()."""
    from mlxrun import distributed, models

    model = models.build_model(config)
    arch = str(config.get("model_type", "unknown"))
    mode = resolve_mode(model, world.parallel, arch)
    if mode == "tensor":
        check_divisible(config, world.size)
    elif len(model.layers) < world.size:
        raise UnsupportedModelError(
            f"pipeline parallel over {world.size} ranks needs at least {world.size} layers; "
            f"{arch} at {path} has {len(model.layers)}",
            hint="Use fewer ranks.",
        )
    world = world.with_mode(mode)
    distributed.set_current(world)
    return world


def tensor_sizes(path: Any) -> dict[str, int]:
    """Stored bytes per tensor name, from the safetensors headers (no tensor data read)."""
    from pathlib import Path

    from mlxrun import hub

    sizes: dict[str, int] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        header = hub.safetensors_header(file)
        header.pop("__metadata__", None)
        for name, meta in header.items():
            begin, end = meta["data_offsets"]
            sizes[name] = int(end) - int(begin)
    return sizes


def rank_weight_bytes(path: Any, config: dict, world: World) -> int:
    """This run's per-rank weight share (the busiest rank's), for the load-time memory check."""
    from mlxrun.memory import text_config

    layers = int(text_config(config).get("num_hidden_layers") or 0)
    return share_bytes(tensor_sizes(path), layers, world.size, world.parallel)
