"""Test tiers: every test is exactly one of `pure`, `model` or `server` (see README "Tests").

- pure:   no model, no MLX forward, no server. `pytest -m pure` runs in seconds.
- model:  builds or loads a tiny model (the checkpoint fixtures, mlx-lm models, convert, generate).
- server: starts uvicorn, runs `mlxrun serve` or drives the HTTP app.

A pytest plugin (conftest.py loads it): `check_tiers` runs at collection, so a new test without a
tier (or with two) stops the run instead of silently missing from every tier, and each pure test
runs inside `pure_guard`, which fails it if it builds an mlx-lm model or a server, or asks for a
checkpoint fixture at run time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

TIERS = ("pure", "model", "server")
# Fixtures that build a checkpoint with weights: a test that asks for one is not pure.
MODEL_FIXTURES = frozenset({"checkpoint_factory", "tiny_llama", "thinking_model"})


def tiers_of(item: pytest.Item) -> list[str]:
    return sorted({m.name for m in item.iter_markers() if m.name in TIERS})


def check_tiers(items: Sequence[pytest.Item]) -> list[str]:
    """One line per test whose tier is missing, doubled, or contradicted by its fixtures."""
    problems = []
    for item in items:
        tiers = tiers_of(item)
        if len(tiers) != 1:
            found = ", ".join(tiers) or "none"
            problems.append(f"{item.nodeid}: needs exactly one tier of {TIERS}, has {found}")
        elif tiers == ["pure"]:
            wanted = sorted(MODEL_FIXTURES.intersection(item.fixturenames))
            if wanted:
                problems.append(f"{item.nodeid}: marked pure but uses {', '.join(wanted)}")
    return problems


class NotPureError(AssertionError):
    """A test marked pure built a model or a server."""


def _refuse(what: str) -> Any:
    def refuse(self: object, *args: object, **kwargs: object) -> None:
        raise NotPureError(f"a pure test built {what}: mark it model or server instead")

    return refuse


@contextlib.contextmanager
def pure_guard(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a pure test that builds a model or a server, or asks for a checkpoint at run time."""
    import mlx.nn as nn
    import starlette.applications
    import uvicorn

    module_init = nn.Module.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        cls = type(self)
        # Every mlx-lm architecture's top-level class is `<arch module>.Model`.
        if cls.__name__ == "Model" and cls.__module__.startswith("mlx_lm.models."):
            raise NotPureError(f"a pure test built {cls.__module__}.Model: mark it model")
        module_init(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "__init__", init)
    monkeypatch.setattr(starlette.applications.Starlette, "__init__", _refuse("an HTTP app"))
    monkeypatch.setattr(uvicorn.Server, "__init__", _refuse("a uvicorn server"))
    yield
    # getfixturevalue() requests are not in the static closure the collection check reads.
    wanted = sorted(MODEL_FIXTURES.intersection(request.fixturenames))
    if wanted:
        raise NotPureError(f"a pure test asked for {', '.join(wanted)}: mark it model")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    problems = check_tiers(items)
    if problems:
        raise pytest.UsageError("tests without exactly one tier:\n" + "\n".join(problems))


@pytest.fixture(autouse=True)
def _tier_guard(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    if request.node.get_closest_marker("pure") is None:
        yield
        return
    with pure_guard(monkeypatch, request):
        yield
