"""`mlxrun serve MODEL` under mlx.launch: one model split across ranks (mlxrun.engine_mirror).

Rank 0 binds the port and serves HTTP over a MirroredEngine; the other ranks load their shard
and mirror its steps. No model pool here: loading or unloading a model is itself a collective
step every rank would have to take together, so a distributed server holds exactly one model.
"""

from __future__ import annotations

import asyncio
import sys
from types import FrameType
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
    """uvicorn over one engine until Ctrl-C / SIGTERM (server.cli._run, without a pool)."""
    import uvicorn

    from mlxrun.server.app import create_app
    from mlxrun.server.cli import GRACEFUL_SHUTDOWN_S, _base_urls, _serve

    uv_config = uvicorn.Config(
        None,  # type: ignore[arg-type]  # set below: the app needs on_fatal, which needs the server
        log_level="warning",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )
    server = uvicorn.Server(uv_config)
    failed: list[BaseException] = []

    def on_fatal(exc: BaseException) -> None:
        failed.append(exc)
        server.should_exit = True

    async def on_ready() -> None:
        while not server.started:
            await asyncio.sleep(0.01)
        for url in _base_urls(host, sock.getsockname()[1]):
            click.echo(f"Serving {config.model_id} across ranks. OpenAI base URL: {url}/v1")
        sys.stdout.flush()

    app = create_app(engine, config, tokenizer=tokenizer, on_fatal=on_fatal, on_ready=on_ready)
    uv_config.app = app
    # A stop signal (mlx.launch tears the run down when a rank died) makes a step that still
    # waits on the other ranks fail at once, so open requests get their 503 before we close.
    handle_exit = server.handle_exit

    def stop_then_exit(sig: int, frame: FrameType | None) -> None:
        engine.stopping()
        handle_exit(sig, frame)

    server.handle_exit = stop_then_exit  # type: ignore[method-assign]
    _serve(server, sock, app.state.keys)
    if failed:
        raise failed[0]
