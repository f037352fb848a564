"""CI runs lint, format and type checks before the tests, with the commands the README documents,
and mypy is strict on the whole pure core."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (mypy, in the test extra, brings tomli there)
    import tomli as tomllib

pytestmark = pytest.mark.pure

ROOT = Path(__file__).resolve().parent.parent
CHECKS = ["ruff check .", "ruff format --check .", ".ci/typecheck", "python -m pytest -q"]
PURE_CORE = {
    "mlxrun.scheduler", "mlxrun.prefix_cache", "mlxrun.sampling", "mlxrun.errors", "mlxrun.memory",
    "mlxrun.convert.plan", "mlxrun.convert.recipes", "mlxrun.engine_commands", "mlxrun.budget",
}  # fmt: skip
STRICT_FLAGS = {
    "disallow_any_generics", "disallow_untyped_calls", "disallow_untyped_defs",
    "disallow_incomplete_defs", "disallow_untyped_decorators", "disallow_subclassing_any",
    "no_implicit_reexport", "strict_equality", "warn_return_any",
}  # fmt: skip


def _lines(text: str) -> list[str]:
    return [line.split("#")[0].strip() for line in text.splitlines()]


def test_ci_runs_every_check_in_order_before_the_tests() -> None:
    lines = _lines((ROOT / ".ci" / "run").read_text())
    positions = [lines.index(check) for check in CHECKS]
    assert positions == sorted(positions)


def test_the_readme_documents_the_same_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    tests = readme[readme.index("## Tests") :]
    for check in CHECKS:
        assert check in _lines(tests)
    for tier in ("pure", "model", "server"):
        assert f"python -m pytest -m {tier}" in tests


def test_mypy_is_strict_on_the_pure_core() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    mypy = config["tool"]["mypy"]
    assert "mypy" in " ".join(config["project"]["optional-dependencies"]["test"])
    strict = [o for o in mypy["overrides"] if STRICT_FLAGS <= {k for k, v in o.items() if v}]
    assert len(strict) == 1 and set(strict[0]["module"]) == PURE_CORE
    for module in PURE_CORE:  # each names a real module (a typo would silently check nothing)
        rel = module.removeprefix("mlxrun.").replace(".", "/") + ".py"
        assert (ROOT / "mlxrun" / rel).exists() or (ROOT / rel).exists(), module
