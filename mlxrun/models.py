"""Architectures come from mlx-lm's model zoo; this is the one place that reaches into it.

`ModelProtocol` names the hooks mlxrun relies on, instead of scattered hasattr checks.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Protocol, runtime_checkable

from mlxrun.errors import UnsupportedModelError


@runtime_checkable
class ModelProtocol(Protocol):
    """What an mlx-lm model gives us: a forward pass over token ids with a KV cache, its layers."""

    layers: Any

    def __call__(self, inputs: Any, cache: Any = None) -> Any: ...


def sanitize(model: Any, weights: dict) -> dict:
    """The architecture's own renaming/stacking of checkpoint tensors (identity when it has none)."""
    fn = getattr(model, "sanitize", None)
    return fn(weights) if fn is not None else weights


def make_cache(model: Any) -> list:
    """A fresh per-sequence KV cache, as the architecture wants it (sliding windows, SSM state…)."""
    from mlx_lm.models.cache import make_prompt_cache

    return make_prompt_cache(model)


def supported_model_types() -> list[str]:
    import mlx_lm.models

    skip = {"base", "cache", "rope_utils", "switch_layers", "activations", "pipeline"}
    return sorted(
        m.name for m in pkgutil.iter_modules(mlx_lm.models.__path__) if m.name not in skip
    )


def model_classes(config: dict) -> tuple[Any, Any]:
    """(Model, ModelArgs) from mlx-lm's zoo for this config."""
    from mlx_lm.utils import MODEL_REMAPPING

    model_type = str(config.get("model_type", ""))
    name = MODEL_REMAPPING.get(model_type, model_type)
    try:
        arch = importlib.import_module(f"mlx_lm.models.{name}")
        return arch.Model, arch.ModelArgs
    except (ImportError, AttributeError):
        types = supported_model_types()
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported types: {', '.join(types)}"
        ) from None


def build_model(config: dict) -> Any:
    """Instantiate the architecture lazily: MLX arrays are lazy, so no weight memory is used."""
    model_cls, args_cls = model_classes(config)
    try:
        return model_cls(args_cls.from_dict(config))
    except (TypeError, KeyError, ValueError) as e:
        raise UnsupportedModelError(
            f"cannot build a {config.get('model_type')} model from this config.json: {e}"
        ) from None
