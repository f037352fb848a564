"""Unified-memory budget: how much memory there is, and what weights + KV cache + runtime need.

Metal-only calls live in exactly two private functions, `_metal_device_info` and
`_metal_set_wired_limit`; everything else is plain arithmetic on config dicts, so it runs (and is
tested) on any machine. Off a Mac the budget is a fraction of physical RAM.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import psutil

from mlxrun.errors import InvalidRequestError, UnsupportedModelError, parse_size

BUDGET_ENV = "MLXRUN_MEMORY_BUDGET"
# Without Metal's recommended working set, plan against 3/4 of RAM: the OS, other apps and the
# allocator's cache need the rest (the same share macOS recommends for the GPU on most Macs).
RAM_FRACTION = 0.75

# Fixed runtime cost on top of weights and KV: Metal command buffers, the allocator's free-block
# cache, the Python process and tokenizer, sampling buffers and the final-token logits.
RUNTIME_MARGIN_BYTES = 512 * 1024**2
# Prefill runs in chunks of at most this many tokens, so activations scale with the chunk,
# not the whole context.
PREFILL_CHUNK_TOKENS = 2048
# Bytes live per (token × hidden unit) at the peak of one layer's forward: about 16 hidden-sized
# bf16 buffers (residual, norm, q/k/v, attention out, gate/up/product of a ~3.5× wide MLP).
ACTIVATION_BYTES_PER_TOKEN_HIDDEN = 32

# Architectures whose mlx-lm model keeps the full context on every layer even though the config
# names a sliding window (mlx-lm's gemma2 builds plain KVCaches; it never rotates).
_WINDOW_IGNORED = frozenset({"gemma2"})


@dataclass(frozen=True)
class DeviceMemory:
    """What this machine has; `budget_bytes` is what the planner plans against."""

    total_bytes: int
    recommended_bytes: int | None
    budget_bytes: int
    source: str  # "metal", "ram-fraction" or "env"


def _metal_device_info() -> dict[str, Any] | None:
    """Metal's device info, or None when Metal is absent or the call fails (the tested seam)."""
    try:
        metal = getattr(mx, "metal", None)
        if metal is None or not metal.is_available():
            return None
        # mlx >= 0.29 has mx.device_info; older releases only mx.metal.device_info.
        get_info = getattr(mx, "device_info", None) or getattr(metal, "device_info", None)
        if get_info is None:
            return None
        info = dict(get_info())
    except Exception:  # any failure here means "no usable Metal", never a crash
        return None
    if "max_recommended_working_set_size" not in info:
        return None
    return info


def _metal_set_wired_limit(limit: int) -> int:
    """Set Metal's wired limit; returns the previous one."""
    return int(mx.set_wired_limit(limit))


def device_memory() -> DeviceMemory:
    """Physical memory, Metal's recommended working set (on a Mac) and the budget to plan against.

    `MLXRUN_MEMORY_BUDGET` (e.g. "16GB") overrides the budget, for users and tests.
    """
    total = int(psutil.virtual_memory().total)
    info = _metal_device_info()
    if info is not None:
        total = int(info.get("memory_size", total))
        working_set = int(info["max_recommended_working_set_size"])
        recommended: int | None = working_set
        budget, source = working_set, "metal"
    else:
        recommended = None
        budget, source = int(total * RAM_FRACTION), "ram-fraction"
    override = os.environ.get(BUDGET_ENV, "").strip()
    if override:
        try:
            budget = parse_size(override)
        except InvalidRequestError:
            raise InvalidRequestError(
                f"cannot read {BUDGET_ENV}={override!r}",
                param=BUDGET_ENV,
                hint="Write sizes like 16GB or 512MB, or unset the variable.",
            ) from None
        source = "env"
    return DeviceMemory(total, recommended, budget, source)


@contextmanager
def wired_limit(limit_bytes: int) -> Iterator[None]:
    """Keep up to `limit_bytes` wired (resident) on Metal for the duration; a no-op elsewhere.

    Clamped to the recommended working set, which Metal refuses to exceed. Work in flight is
    synchronized before the old limit comes back, as changing it mid-eval is unsafe.
    """
    info = _metal_device_info()
    if info is None:
        yield
        return
    limit = min(int(limit_bytes), int(info["max_recommended_working_set_size"]))
    old = _metal_set_wired_limit(limit)
    try:
        yield
    finally:
        mx.synchronize()
        _metal_set_wired_limit(old)


# --- KV cache -------------------------------------------------------------------------------


@dataclass(frozen=True)
class KVLayout:
    """Per-token KV geometry: every attention layer stores n_kv_heads × head_dim keys and values;
    `windows[i]` caps layer i at that many tokens (None: the whole context)."""

    n_kv_heads: int
    head_dim: int
    windows: tuple[int | None, ...]

    @property
    def num_layers(self) -> int:
        return len(self.windows)


def _first(cfg: dict[str, Any], *names: str) -> Any:
    for name in names:
        if cfg.get(name) is not None:
            return cfg[name]
    return None


def _with_arch_defaults(cfg: dict[str, Any]) -> dict[str, Any]:
    """Fill fields the config leaves out with the defaults of mlx-lm's ModelArgs for its
    architecture (e.g. gemma3's head_dim 256), so we count what the runtime will build."""
    try:
        from mlxrun.models import model_classes

        _, args_cls = model_classes(cfg)
        args = args_cls.from_dict(cfg)
    except Exception:  # unknown or partial config: plan from the raw dict
        return cfg
    filled = {k: v for k, v in vars(args).items() if v is not None}
    return {**cfg, **filled}


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's config with defaults resolved; `text_config` (multimodal) wins over
    the outer keys. The input is never modified."""
    cfg = _with_arch_defaults(copy.deepcopy(config))
    inner = cfg.get("text_config")
    if isinstance(inner, dict):
        merged = {k: v for k, v in cfg.items() if k != "text_config"}
        merged.update(inner)
        cfg = _with_arch_defaults(merged)
    return cfg


def _layer_windows(cfg: dict[str, Any], num_layers: int) -> tuple[int | None, ...]:
    """Which layers hold only a sliding window of tokens, mirroring mlx-lm's make_cache."""
    full: tuple[int | None, ...] = (None,) * num_layers
    window = cfg.get("sliding_window")
    if not window or cfg.get("use_sliding_window") is False:
        return full
    if cfg.get("model_type") in _WINDOW_IGNORED:
        return full
    types = cfg.get("layer_types")
    if isinstance(types, list) and len(types) == num_layers:
        return tuple(int(window) if t == "sliding_attention" else None for t in types)
    pattern = cfg.get("sliding_window_pattern")
    if isinstance(pattern, int) and pattern > 0:
        # gemma3 / cohere2: every pattern-th layer is global, the rest slide.
        return tuple(None if i % pattern == pattern - 1 else int(window) for i in range(num_layers))
    return full


def kv_layout(config: dict[str, Any]) -> KVLayout:
    """KV geometry from a Hub config.json dict (pure; raises UnsupportedModelError if unreadable)."""
    cfg = text_config(config)
    layers = _first(cfg, "num_hidden_layers", "n_layer", "num_layers")
    heads = _first(cfg, "num_attention_heads", "n_head", "num_heads")
    if layers is None or heads is None:
        raise UnsupportedModelError(
            "cannot size the KV cache: config.json names no layer or attention-head count"
        )
    kv_heads = _first(cfg, "num_key_value_heads", "num_kv_heads", "n_kv_heads") or heads
    head_dim = cfg.get("head_dim")
    if head_dim is None:
        hidden = _first(cfg, "hidden_size", "n_embd", "d_model")
        if hidden is None:
            raise UnsupportedModelError("cannot size the KV cache: config.json names no head_dim")
        head_dim = hidden // heads
    return KVLayout(int(kv_heads), int(head_dim), _layer_windows(cfg, int(layers)))


def kv_cache_bytes(config: dict[str, Any], context: int, dtype_bytes: int = 2) -> int:
    """Bytes of keys + values for one sequence of `context` tokens:
    per layer 2 × n_kv_heads × head_dim × min(context, window) × dtype_bytes."""
    layout = kv_layout(config)
    per_token = 2 * layout.n_kv_heads * layout.head_dim * dtype_bytes
    return sum(per_token * (context if w is None else min(context, w)) for w in layout.windows)


def runtime_margin_bytes(config: dict[str, Any], context: int, dtype_bytes: int = 2) -> int:
    """RUNTIME_MARGIN_BYTES, plus prefill activations (chunk × hidden × bytes per unit), plus the
    sliding-window overshoot: during a prefill chunk a window layer briefly holds
    window - 1 + chunk tokens (mlx-lm's RotatingKVCache keeps every token of the chunk in view)."""
    cfg = text_config(config)
    hidden = int(_first(cfg, "hidden_size", "n_embd", "d_model") or 0)
    chunk = min(context, PREFILL_CHUNK_TOKENS)
    layout = kv_layout(config)
    per_token = 2 * layout.n_kv_heads * layout.head_dim * dtype_bytes
    overshoot = sum(
        per_token * (min(context, w - 1 + chunk) - min(context, w))
        for w in layout.windows
        if w is not None
    )
    return RUNTIME_MARGIN_BYTES + chunk * hidden * ACTIVATION_BYTES_PER_TOKEN_HIDDEN + overshoot


def footprint(
    weights_bytes: int,
    config: dict[str, Any],
    context: int,
    dtype_bytes: int = 2,
    *,
    ranks: int = 1,
) -> int:
    """Everything one sequence of `context` tokens needs resident: weights + KV + margin.
    Across `ranks` machines each holds its share of the KV cache (by heads or by layers) and
    the whole activation margin; `weights_bytes` is then that rank's share."""
    return (
        weights_bytes
        + -(-kv_cache_bytes(config, context, dtype_bytes) // ranks)
        + runtime_margin_bytes(config, context, dtype_bytes)
    )


# --- allocation failures --------------------------------------------------------------------

# What MLX's allocators say when a buffer cannot be had (Metal's malloc, its command buffers, the
# CPU allocator). Matched on MLX's own RuntimeError text: MLX raises no typed error for it.
_ALLOCATION_MARKERS = ("unable to allocate", "insufficient memory", "out of memory",
                       "attempting to allocate", "maximum allowed buffer size")  # fmt: skip


def is_allocation_failure(exc: BaseException) -> bool:
    """Whether `exc` is MLX failing to allocate memory (as opposed to a bug)."""
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(m in text for m in _ALLOCATION_MARKERS)


def allocation_point(nbytes: int) -> None:
    """Called by the engine before it computes a request's prompt chunk: the seam through which
    tests simulate MLX running out of memory mid-request (they replace it with one that raises
    MLX's RuntimeError). It does nothing in production."""


def release_cache() -> None:
    """Hand the allocator's spare buffers back (after a model is unloaded)."""
    mx.clear_cache()
