"""mlxrun: a local LLM runtime for Apple Silicon on MLX."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # `mlxrun.load` without importing MLX at package import (keeps `mlxrun --help` fast).
    if name == "load":
        from mlxrun.loader import load

        return load
    raise AttributeError(f"module 'mlxrun' has no attribute {name!r}")
