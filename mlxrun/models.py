"""Architectures come from mlx-lm's model zoo; this is the one place that reaches into it.

`ModelProtocol` names the hooks mlxrun relies on, instead of scattered hasattr checks.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, cast, runtime_checkable

from mlxrun.errors import UnsupportedModelError

if TYPE_CHECKING:
    import mlx.core as mx
    import mlx.nn as nn


@runtime_checkable
class ModelProtocol(Protocol):
    """What an mlx-lm model gives us (an `nn.Module` subclass per architecture): a forward pass
    over token ids with a KV cache, its transformer blocks, and the Module methods we call.
    Optional hooks (`sanitize`, `make_cache`, `quant_predicate`, `cast_predicate`) are looked up
    with getattr where used, since most architectures lack some of them."""

    @property
    def layers(self) -> Sequence[Any]: ...

    def __call__(self, inputs: mx.array, cache: Any = None) -> mx.array: ...

    def parameters(self) -> dict[str, Any]: ...

    def named_modules(self) -> list[tuple[str, nn.Module]]: ...

    def load_weights(self, file_or_weights: Any, strict: bool = True) -> Any: ...

    def eval(self) -> Any: ...


def sanitize(model: ModelProtocol, weights: dict[str, Any]) -> dict[str, Any]:
    """The architecture's own renaming/stacking of checkpoint tensors (identity when it has none)."""
    fn = getattr(model, "sanitize", None)
    return fn(weights) if fn is not None else weights


def make_cache(model: ModelProtocol) -> list[Any]:
    """A fresh per-sequence KV cache, as the architecture wants it (sliding windows, SSM state…)."""
    from mlx_lm.models.cache import make_prompt_cache

    return make_prompt_cache(cast("nn.Module", model))


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


def build_model(config: dict[str, Any]) -> ModelProtocol:
    """Instantiate the architecture lazily: MLX arrays are lazy, so no weight memory is used."""
    model_cls, args_cls = model_classes(config)
    try:
        return model_cls(args_cls.from_dict(config))
    except (TypeError, KeyError, ValueError) as e:
        raise UnsupportedModelError(
            f"cannot build a {config.get('model_type')} model from this config.json: {e}"
        ) from None
