"""`mlxrun serve MODEL` under mlx.launch: one model split across ranks (mlxrun.engine_mirror).

Rank 0 binds the port and serves HTTP over a MirroredEngine; the other ranks load their shard
and mirror its steps. No model pool here: loading or unloading a model is itself a collective
step every rank would have to take together, so a distributed server holds exactly one model.
"""

from __future__ import annotations

from typing import Any

import click

from mlxrun.errors import InvalidRequestError


def serve_distributed(world: Any, models: tuple[str, ...], host: str, port: int,
                      context: int | None, step_timeout: float, engine_kw: dict,
                      server_kw: dict) -> None:  # fmt: skip
    from mlxrun import distributed
    from mlxrun.engine_mirror import make_engine, run_follower
    from mlxrun.generate import engine_config
    from mlxrun.loader import load
    from mlxrun.server.cli import _bind

    if len(models) != 1:
        raise InvalidRequestError(
            f"a distributed server holds exactly one model, got {len(models)}", param="model",
            hint="Pass one MODEL to `mlxrun launch ... serve MODEL`.",
        )  # fmt: skip
    distributed.quiet_followers(world)
    sock = _bind(host, port) if world.leader else None  # rank 0 alone owns HTTP
    lm, tokenizer, info = load(models[0], context=context, world=world)
    distributed.announce(distributed.current())
    click.echo(f"Loading {info.name}...", err=True)
    config = engine_config(tokenizer, info.name, info.context_length, **engine_kw)
    engine = make_engine(lm, config, step_timeout_s=step_timeout)
    if sock is None:
        run_follower(engine)
        return
    from mlxrun.server.app import ServerConfig

    aliases = tuple(a for a in server_kw.pop("aliases") if a != info.name)
    server_config = ServerConfig(model_id=info.name, context_length=info.context_length,
                                 aliases=aliases, **server_kw)  # fmt: skip
    _run_engine(engine, server_config, tokenizer, host, sock)
    click.echo("Stopped.")


def _run_engine(engine: Any, config: Any, tokenizer: Any, host: str, sock: Any) -> None:
    """uvicorn over one mirrored engine until Ctrl-C / SIGTERM (no pool). A stop signal
    (mlx.launch tears the run down when a rank died) makes a step that still waits on the
    other ranks fail at once, so open requests get their 503 before connections close."""
    from mlxrun.server.app import create_app
    from mlxrun.server.cli import run_uvicorn

    def announce(app: Any, urls: list[str]) -> None:
        for url in urls:
            click.echo(f"Serving {config.model_id} across ranks. OpenAI base URL: {url}")

    def build(on_fatal: Any, on_ready: Any) -> Any:
        return create_app(engine, config, tokenizer=tokenizer, on_fatal=on_fatal,
                          on_ready=on_ready)  # fmt: skip

    run_uvicorn(build, host, sock, announce, on_stop_signal=engine.stopping)
