"""The front ends, one module per command; `main` (the `mlxrun` command group) is in group.py.

Importing this package registers nothing, so a command module (server/cli.py) can import
mlxrun.cli.common without importing every other command first (which would import it again).
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "main":  # the console script's `mlxrun.cli:main`
        from mlxrun.cli.group import main

        return main
    raise AttributeError(f"module 'mlxrun.cli' has no attribute {name!r}")
