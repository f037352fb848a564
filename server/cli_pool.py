"""`mlxrun serve [MODEL ...]` with the model pool: which models are servable, the budget they
share, and the banner. The flags themselves are in server/cli.py."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import click

from mlxrun.errors import InvalidRequestError, ModelNotFoundError, format_size


def pick_models(models: Sequence[str]) -> tuple[list[str], bool]:
    """(names, explicit): the named models, else every stored model; none at all is an error
    with the next step to take."""
    from mlxrun.cli.run import PULL_HINT, stored_names

    if models:
        return list(models), True
    names = stored_names()
    if not names:
        raise ModelNotFoundError("no model given and none in the store", hint=PULL_HINT)
    return names, len(names) == 1


def build_specs(names: Sequence[str], aliases: Sequence[str], context: int | None) -> list[Any]:
    """A ModelSpec per name (checked now: a wrong name fails before the server starts), with
    its models.toml settings; --alias and --context go to the first (default) model, --context
    to every model that models.toml gives none."""
    from mlxrun import hub, store
    from mlxrun.model_settings import load_settings
    from mlxrun.server.models_pool import ModelSpec

    settings = load_settings()
    specs, seen = [], set()
    for i, text in enumerate(names):
        path = store.resolve_model(text)
        hub.read_config(path)
        name = store.default_name(text)
        if name in seen:
            raise InvalidRequestError(f"model {name} is named twice", param="model")
        seen.add(name)
        own = settings.get(name) or settings.get(text)
        extra = tuple(aliases) if i == 0 else ()
        specs.append(
            ModelSpec(
                name=name,
                path=text,
                aliases=tuple(dict.fromkeys((*(own.aliases if own else ()), *extra))),
                context=(own.context if own and own.context else None) or context,
                keep_alive_s=own.keep_alive_s if own else None,
                draft=own.draft if own else None,
                sampling=dict(own.sampling) if own else {},
            )
        )
    return specs


def pool_settings(memory_budget: str | None, max_loaded: int | None, keep_alive: str,
                  engine: Any, preload: bool) -> Any:  # fmt: skip
    from mlxrun.errors import parse_size
    from mlxrun.governor import parse_keep_alive
    from mlxrun.memory import device_memory
    from mlxrun.server.models_pool import PoolSettings

    if memory_budget is None:
        budget = device_memory().budget_bytes
    else:
        try:
            budget = parse_size(memory_budget)
        except InvalidRequestError:
            raise InvalidRequestError(f"--memory-budget: cannot read {memory_budget!r}",
                                      param="memory_budget",
                                      hint="Write it like 24GB or 512MB.") from None  # fmt: skip
    try:
        keep = parse_keep_alive(keep_alive)
    except InvalidRequestError as e:
        raise InvalidRequestError(f"--keep-alive: {e.message}", param="keep_alive",
                                  hint=e.hint) from None  # fmt: skip
    return PoolSettings(budget, max_loaded, keep, engine, preload_default=preload)


def banner(pool: Any, urls: list[str], keys: Any) -> None:
    """What serves where: the default model (with its facts once loaded), the others, the key."""
    echo = click.echo
    default = pool.default
    slot = pool.slots.get(default.name) if default is not None else None
    if slot is not None:
        info = slot.info
        echo(f"mlxrun: serving {info.name} ({info.architecture}, {info.quantization}, "
             f"context {slot.state.config.context_length})")  # fmt: skip
    else:
        echo(f"mlxrun: serving {len(pool.specs)} models (each loads on first use)")
    echo(f"  OpenAI base URL: {urls[0]}")
    for url in urls[1:]:
        echo(f"  on the network:  {url}")
    for spec in pool.specs:
        names = f" (aliases: {', '.join(spec.aliases)})" if spec.aliases else ""
        echo(f"  model id:        {spec.name}{names}")
    keep = pool.settings.keep_alive_s
    keep_text = "stay loaded" if keep == float("inf") else f"unload after {keep:g} s"
    limit = f", at most {pool.settings.max_loaded} loaded" if pool.settings.max_loaded else ""
    echo(f"  memory budget:   {format_size(pool.settings.budget_bytes)}{limit}; idle models "
         f"{keep_text}")  # fmt: skip
    names = f", keys: {', '.join(keys.names)}" if keys else ""
    echo(
        "  API key:         " + (f"required (Authorization: Bearer ...{names})" if keys else "none")
    )
    echo("Press Ctrl-C to stop.")
