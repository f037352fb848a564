"""Model name, path or Hub id -> (model, tokenizer, ModelInfo), with lazy weights and a memory check.

Weights are opened with `mx.load`, which maps tensors lazily: nothing is read from disk until the
first forward pass evaluates it, so loading is instant and the memory check runs on file sizes.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import mlx.core as mx
import mlx.nn as nn

from mlxrun import hfconfig, hub, memory, models, safety, sharding, store
from mlxrun.distributed import World
from mlxrun.errors import (
    CorruptCheckpointError,
    InsufficientMemoryError,
    InvalidRequestError,
    NotAModelError,
    UnsupportedModelError,
    format_size,
)

if TYPE_CHECKING:
    from mlxrun.models import ModelProtocol
    from mlxrun.tokenizer import Tokenizer

_log = logging.getLogger(__name__)

# Planning context when config.json names none (rare: every mainstream family records it).
DEFAULT_CONTEXT = 4096
_FLOAT32_NAMES = ("float32", "fp32", "f32")


@dataclass(frozen=True)
class ModelInfo:
    """What a loaded model is, for front ends and the memory planner."""

    name: str
    path: Path
    architecture: str
    context_length: int  # the limit generation enforces (--context, else the model's own)
    bits_per_weight: float
    weights_bytes: int
    kv_bytes_per_token: int
    quantization: str  # "4-bit g64", "mixed_4_6 g64", "bf16", …
    eos_token_ids: tuple[int, ...] = ()  # config.json + generation_config.json


def read_eos_ids(path: Path, config: dict) -> tuple[int, ...]:
    """EOS ids from config.json and generation_config.json (which often lists several)."""
    ids: list[int] = []
    sources = [config]
    gen = path / "generation_config.json"
    if gen.is_file():
        try:
            data = json.loads(gen.read_text())
            if isinstance(data, dict):
                sources.append(data)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            pass  # a broken optional file must not stop the model from loading
    for src in sources:
        value = src.get("eos_token_id")
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, int) and not isinstance(v, bool) and v not in ids:
                ids.append(v)
    return tuple(ids)


def _kv_dtype_bytes(config: dict) -> int:
    """KV entries take the activation dtype: float32 checkpoints keep 4 bytes, the rest 2."""
    if "quantization" in config:
        return 2
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "").lower()
    return 4 if dtype in _FLOAT32_NAMES else 2


def check_memory(
    weights_bytes: int, config: dict, context: int, *, force: bool = False, ranks: int = 1
) -> tuple[int, int]:
    """(needed, budget) bytes; InsufficientMemoryError when needed > budget, unless force.
    With `ranks` > 1, `weights_bytes` is this rank's share and the KV cache splits too."""
    kv_bytes = _kv_dtype_bytes(config)
    needed = memory.footprint(weights_bytes, config, context, kv_bytes, ranks=ranks)
    budget = memory.device_memory().budget_bytes
    if needed > budget and not force:
        kv = -(-memory.kv_cache_bytes(config, context, kv_bytes) // ranks)
        raise InsufficientMemoryError(
            f"this model needs {format_size(needed)} (weights {format_size(weights_bytes)}, "
            f"KV cache for {context} tokens {format_size(kv)}, runtime margin) but the memory "
            f"budget is {format_size(budget)}: {format_size(needed - budget)} missing",
            needed=needed,
            available=budget,
            hint="Pass a shorter --context, use a smaller or lower-bit model, or pass --force.",
        )
    return needed, budget


def _check_files(files: list[Path]) -> None:
    """Every safetensors file must hold all the bytes its header promises (catches truncation)."""
    for file in files:
        hub.checked_safetensors_header(file)


def load_weight_files(path: Path) -> dict[str, mx.array]:
    """All tensors of a model directory, as lazy arrays (nothing is read yet)."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise NotAModelError(f"{path} holds no *.safetensors weights")
    _check_files(files)
    weights: dict[str, mx.array] = {}
    for file in files:
        try:
            weights.update(cast("dict[str, mx.array]", mx.load(str(file))))  # safetensors: a dict
        except (ValueError, RuntimeError, OSError) as e:
            raise CorruptCheckpointError(f"cannot read {file}: {e}") from None
    return weights


def _infer_quant(path: str, module: nn.Module, weights: dict, default: dict) -> dict:
    """group_size / bits / mode a layer was packed with, read off the stored shapes."""
    in_dims = module.weight.shape[-1]
    scales = weights[f"{path}.scales"]
    group_size = in_dims // scales.shape[-1]
    bits = weights[f"{path}.weight"].shape[-1] * 32 // in_dims
    # Only affine keeps scales in a float dtype; the microscaling modes store uint8 exponents.
    mode = "affine" if scales.dtype != mx.uint8 else default.get("mode", "mxfp4")
    return {"group_size": group_size, "bits": bits, "mode": mode}


def quantize_like_weights(model: nn.Module, weights: dict, quant: dict) -> None:
    """Swap in quantized modules exactly where the checkpoint stores `<path>.scales`."""

    def predicate(path: str, module: nn.Module) -> bool | dict:
        if f"{path}.scales" not in weights or not hasattr(module, "to_quantized"):
            return False
        inferred = _infer_quant(path, module, weights, quant)
        override = quant.get(path)
        return {**inferred, **override} if isinstance(override, dict) else inferred

    nn.quantize(
        model,
        group_size=int(quant.get("group_size", 64)),
        bits=int(quant.get("bits", 4)),
        mode=quant.get("mode", "affine"),
        class_predicate=predicate,
    )


def build_and_load(path: Path, config: dict[str, Any], world: World | None = None) -> ModelProtocol:
    """The architecture with this directory's weights attached (lazily); model.eval() done.
    With a `world`, only this rank's shard is kept, and it is materialised (see sharding)."""
    if "quantization" not in config and isinstance(config.get("quantization_config"), dict):
        method = config["quantization_config"].get("quant_method", "unknown")
        raise UnsupportedModelError(
            f"{path} is pre-quantized with {method!r}, which mlxrun does not load",
            hint="Convert the original (unquantized) checkpoint with `mlxrun convert`.",
        )
    model = models.build_model(config)
    if world is not None:
        sharding.before_weights(model, world)
    weights = load_weight_files(path)
    # Idempotent on MLX checkpoints (mlx-lm saves sanitized names and re-sanitizes on load too).
    weights = models.sanitize(model, weights)
    if world is not None:
        weights = sharding.local_weights(model, world, weights)
    quant = config.get("quantization")
    if isinstance(quant, dict):
        try:
            quantize_like_weights(cast(nn.Module, model), weights, quant)
        except (ValueError, KeyError) as e:
            raise CorruptCheckpointError(f"{path}: quantized weights do not fit: {e}") from None
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise CorruptCheckpointError(
            f"{path}: weights do not match the {config.get('model_type')} architecture: {e}"
        ) from None
    if world is not None:
        sharding.after_weights(model, world)
    model.eval()
    return model


def model_info(name: str, path: Path, config: dict, context: int) -> ModelInfo:
    """ModelInfo from config.json and the safetensors headers (no tensor data read)."""
    stored, logical, by_dtype = store.weight_stats(path, config)
    meta = store.read_metadata(path)
    return ModelInfo(
        name=name,
        path=path,
        architecture=str(config.get("model_type", "unknown")),
        context_length=context,
        bits_per_weight=stored * 8 / logical if logical else 0.0,
        weights_bytes=store.weight_bytes(path),
        kv_bytes_per_token=memory.kv_cache_bytes(config, 1, _kv_dtype_bytes(config)),
        quantization=store.quantization_label(config, by_dtype, meta.get("recipe")),
        eos_token_ids=read_eos_ids(path, config),
    )


def _exact_limit(config: dict, context: int | None) -> int:
    """The context to plan and enforce, kept within a sliding window the class ignores.

    mlx-lm's class then attends to every token where the original model sees only the window,
    so outputs agree only up to it: the default stops there, and a longer --context is refused.
    Past the model's maximum a context is kept (rope scaling can stretch a model) but said out
    loud: quality usually falls apart there.
    """
    own = store.context_length(config)
    if context is not None and own and context > own:
        _log.warning("context %d is beyond the model's maximum of %d tokens: expect poor output "
                     "past %d", context, own, own)  # fmt: skip
    own = own or DEFAULT_CONTEXT
    window = hfconfig.unhonoured_window(config)
    if window is None or (context or own) <= window:
        return context or own
    if context is None:
        return window
    raise UnsupportedModelError(
        f"a context of {context} tokens is past this model's sliding_window ({window}), which "
        f"mlx-lm's {config.get('model_type')} model does not apply: outputs past {window} "
        "tokens would differ from the original model",
        hint=f"Pass --context {window} or less.",
    )


def load(
    name_or_path: str | Path,
    *,
    context: int | None = None,
    force: bool = False,
    world: World | None = None,
) -> tuple[ModelProtocol, Tokenizer, ModelInfo]:
    """(model, tokenizer, info) for a store name, a local model directory or a Hub repo id.

    `context` is the longest sequence to plan (and allow) for; default: the model's own length.
    Refuses with InsufficientMemoryError when weights + KV + margin exceed the memory budget,
    unless `force`. With a `world` (mlx.launch), every rank loads and checks only its shard;
    the mode it settled on is in `distributed.current()`.
    """
    from mlxrun.tokenizer import load_tokenizer

    text = str(name_or_path)
    path = store.resolve_model(text)
    raw = hub.read_config(path)
    safety.check_config(raw, str(path / "config.json"))  # before any size allocates memory
    # transformers-5 keys -> what mlx-lm's classes read; UnsupportedModelError before any file
    # is opened when the class would drop a key that changes the math.
    config = hfconfig.normalize(raw)
    if context is not None and context < 1:
        raise InvalidRequestError(f"context must be >= 1, got {context}", param="context")
    limit = _exact_limit(config, context)
    info = model_info(store.default_name(text), path, config, limit)
    weights_bytes, ranks = info.weights_bytes, 1
    if world is not None:
        world = sharding.plan_world(path, config, world)
        weights_bytes, ranks = sharding.rank_weight_bytes(path, config, world), world.size
    check_memory(weights_bytes, config, limit, force=force, ranks=ranks)
    model = build_and_load(path, config, world)
    tokenizer = load_tokenizer(path, info.eos_token_ids)
    return model, tokenizer, info
