"""`mlxrun serve MODEL`: an OpenAI-compatible HTTP server for one model."""

from __future__ import annotations

import ipaddress
import signal
import socket
import sys
from typing import Any

import click

from mlxrun.cli_common import friendly_errors

GRACEFUL_SHUTDOWN_S = 5  # in-flight requests get this long to finish; the rest are aborted


def _cache_bytes(text: str | None) -> int | None:
    from mlxrun.errors import InvalidRequestError, parse_size

    if text is None:
        return None
    if text.strip().lower() in ("0", "off", "none"):
        return 0
    try:
        return parse_size(text)
    except InvalidRequestError as e:
        raise InvalidRequestError(
            f"--cache-memory: {e.message}", param="cache_memory", hint="Write it like 2GB or 512MB."
        ) from None


def _private_dir(path: str) -> None:
    """--responses-dir made (0700) now, so an unusable path fails before the model loads."""
    import os

    from mlxrun.errors import InvalidRequestError

    try:
        os.makedirs(os.path.expanduser(path), mode=0o700, exist_ok=True)
    except OSError as e:
        raise InvalidRequestError(f"--responses-dir {path}: {e.strerror}",
                                  param="responses_dir") from None  # fmt: skip


def _bind(host: str, port: int) -> socket.socket:
    """The server's socket, bound now so a busy port is a one-line error before anything loads.
    uvicorn starts listening on it once the model is in memory (until then connections are
    refused rather than left hanging)."""
    from mlxrun.errors import InvalidRequestError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise InvalidRequestError(
            f"cannot resolve --host {host!r}: {e.strerror}", param="host"
        ) from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise InvalidRequestError(
            f"cannot listen on {host}:{port}: {e.strerror}",
            param="port",
            hint="Pick another --port, or stop the program that uses this one.",
        ) from None
    return sock


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _banner(info: Any, base_url: str, aliases: tuple[str, ...], api_key: str | None) -> None:
    echo = click.echo
    echo(f"mlxrun: serving {info.name} ({info.architecture}, {info.quantization}, "
         f"context {info.context_length})")  # fmt: skip
    echo(f"  OpenAI base URL: {base_url}")
    names = ", ".join(aliases)
    echo(f"  model id:        {info.name}" + (f" (aliases: {names})" if names else ""))
    echo("  API key:         " + ("required (Authorization: Bearer ...)" if api_key else "none"))
    echo("Press Ctrl-C to stop.")


@click.command("serve")
@click.argument("model")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--api-key",
    envvar="MLXRUN_API_KEY",
    default=None,
    help="Require this bearer key on every request but /health (or set MLXRUN_API_KEY).",
)
@click.option("--alias", "aliases", multiple=True,
              help="Another model id clients may use; a pattern such as 'claude-*' accepts every "
              "matching name (Claude Code asks for its own model names).")  # fmt: skip
@click.option("--context", type=click.IntRange(min=1), default=None, help="Context length.")
@click.option("--max-running", type=click.IntRange(min=1), default=16, show_default=True,
              help="Requests decoded together in one batch.")  # fmt: skip
@click.option("--cache-memory", default=None, help="Prefix-cache memory, e.g. 2GB (0 = off).")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Directory for the prefix cache's disk tier (off by default).")  # fmt: skip
@click.option("--cors-origin", "cors_origins", multiple=True,
              help="Allow browser requests from this origin (repeatable; off by default).")  # fmt: skip
@click.option("--tool-parser", default=None,
              help="Tool-call format (hermes, llama3, mistral…); detected from the model's chat "
              "template by default.")  # fmt: skip
@click.option("--strict", is_flag=True, default=False,
              help="Reject what OpenAI rejects: unknown request fields and a max_tokens past the "
              "context (by default they are reported and ignored, or clamped).")  # fmt: skip
@click.option("--responses-dir", type=click.Path(file_okay=False), default=None,
              help="Keep stored /v1/responses responses here across restarts (memory only by "
              "default).")  # fmt: skip
@friendly_errors
def serve_cmd(
    model: str,
    host: str,
    port: int,
    api_key: str | None,
    aliases: tuple[str, ...],
    context: int | None,
    max_running: int,
    cache_memory: str | None,
    cache_dir: str | None,
    cors_origins: tuple[str, ...],
    tool_parser: str | None,
    strict: bool,
    responses_dir: str | None = None,
) -> None:
    """Serve MODEL over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions…)."""
    cache_bytes = _cache_bytes(cache_memory)
    if tool_parser is not None:
        from mlxrun.tools import tool_format_by_name

        tool_format_by_name(tool_parser)  # an unknown name fails before the model loads
    if responses_dir is not None:
        _private_dir(responses_dir)
    sock = _bind(host, port)
    import uvicorn

    from mlxrun.engine import Engine
    from mlxrun.loader import load
    from mlxrun.server.app import ServerConfig, create_app

    lm, tokenizer, info = load(model, context=context)
    click.echo(f"Loading {info.name}...", err=True)
    _read_weights(lm)
    engine_config = _engine_config(tokenizer, info, max_running, cache_bytes, cache_dir)
    config = ServerConfig(
        model_id=info.name,
        context_length=info.context_length,
        aliases=tuple(a for a in aliases if a != info.name),
        api_key=api_key or None,
        cors_origins=cors_origins,
        tool_parser=tool_parser,
        strict=strict,
        responses_dir=responses_dir,
    )
    uv_config = uvicorn.Config(
        None,  # set below: the app needs on_fatal, which needs the server
        log_level="warning",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )
    server = uvicorn.Server(uv_config)
    failed: list[BaseException] = []

    def on_fatal(exc: BaseException) -> None:
        failed.append(exc)
        server.should_exit = True

    uv_config.app = create_app(Engine(lm, engine_config), config, tokenizer=tokenizer,
                               on_fatal=on_fatal)  # fmt: skip
    shown = f"[{host}]" if ":" in host else host
    _banner(info, f"http://{shown}:{sock.getsockname()[1]}/v1", config.aliases, config.api_key)
    if not _is_loopback(host) and not config.api_key:
        click.echo("Warning: listening beyond this machine with no --api-key.", err=True)
    _serve(server, sock)
    if failed:
        raise failed[0]
    click.echo("Stopped.")


def _engine_config(
    tokenizer: Any, info: Any, max_running: int, cache_bytes: int | None, cache_dir: str | None
) -> Any:
    from mlxrun.engine import EngineConfig

    return EngineConfig(
        max_running=max_running,
        # The tokenizer's set adds the chat template's end-of-turn tokens to config.json's eos.
        eos_token_ids=tuple(sorted(tokenizer.eos_token_ids)),
        namespace=info.name,
        context_length=info.context_length,
        cache_dir=cache_dir,
        **({} if cache_bytes is None else {"cache_memory_bytes": cache_bytes}),
    )


def _read_weights(model: Any) -> None:
    """Page the (lazily mapped) weights in on this thread: MLX ties lazy arrays to the stream of
    the thread that made them, and the engine starts on a worker thread."""
    import mlx.core as mx

    mx.eval(model.parameters())


def _serve(server: Any, sock: socket.socket) -> None:
    # uvicorn replays the signal that stopped it once it has shut down; with no-op handlers that
    # replay does nothing, so Ctrl-C / SIGTERM end in "Stopped." and exit status 0.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
        sys.stdout.flush()


if __name__ == "__main__":
    serve_cmd()
