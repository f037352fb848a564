"""`mlxrun serve MODEL`: an OpenAI-compatible HTTP server for one model."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import signal
import socket
import sys
from typing import Any

import click

from mlxrun.cli.common import friendly_errors

LOG_LEVELS = ("debug", "info", "warning", "error")
GRACEFUL_SHUTDOWN_S = 5  # in-flight requests get this long to finish; the rest are aborted


def _cache_bytes(text: str | None, flag: str = "--cache-memory") -> int | None:
    from mlxrun.errors import InvalidRequestError, parse_size

    if text is None:
        return None
    if text.strip().lower() in ("0", "off", "none"):
        return 0
    try:
        return parse_size(text)
    except InvalidRequestError as e:
        raise InvalidRequestError(
            f"{flag}: {e.message}",
            param=flag.lstrip("-").replace("-", "_"),
            hint="Write it like 2GB or 512MB.",
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


def _disk_bytes(text: str | None, cache_dir: str | None) -> int | None:
    from mlxrun.errors import InvalidRequestError

    size = _cache_bytes(text, "--cache-disk-size")
    if size is not None and cache_dir is None:
        raise InvalidRequestError(
            "--cache-disk-size needs --cache-dir", param="cache_disk_size",
            hint="Add --cache-dir DIR (the disk tier is off without it).",
        )  # fmt: skip
    return size


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


def _check_exposure(host: str, has_key: bool, key_file: str | None, no_auth: bool) -> None:
    """A non-loopback --host needs a key (or an explicit --no-auth): servers bound to every
    interface with no key are how open model servers end up on the internet."""
    from mlxrun.errors import InvalidRequestError
    from mlxrun.server.auth import read_key_file

    if key_file is not None:
        read_key_file(key_file)  # a bad file is a one-line error before the model loads
    if no_auth:
        click.echo(f"Warning: --no-auth: anyone who can reach {host} may use this server.",
                   err=True)  # fmt: skip
    if _is_loopback(host) or has_key or key_file is not None or no_auth:
        return
    raise InvalidRequestError(
        f"refusing to listen on {host} without an API key: anyone on the network could use "
        "this server. Pass --api-key KEY or --api-key-file FILE (or --no-auth to allow it)",
        param="host",
    )


def _lan_address() -> str | None:
    """This machine's address on its network (the one a route out would use); None offline.
    A UDP connect sends nothing: it only asks the kernel to pick the interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.254.254.254", 1))
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if ipaddress.ip_address(address).is_loopback else address


def _base_urls(host: str, port: int) -> list[str]:
    """URLs a client can use: for a wildcard host (0.0.0.0, ::) this machine's loopback and LAN
    addresses, never the wildcard itself (no client can connect to it)."""
    try:
        wildcard = ipaddress.ip_address(host).is_unspecified
    except ValueError:
        wildcard = False
    if not wildcard:
        hosts = [host]
    else:
        lan = _lan_address()
        hosts = ["127.0.0.1" if ":" not in host else "::1", *([lan] if lan else [])]
    return [f"http://{f'[{h}]' if ':' in h else h}:{port}/v1" for h in hosts]


def _banner(info: Any, urls: list[str], aliases: tuple[str, ...], keys: Any) -> None:
    echo = click.echo
    echo(f"mlxrun: serving {info.name} ({info.architecture}, {info.quantization}, "
         f"context {info.context_length})")  # fmt: skip
    echo(f"  OpenAI base URL: {urls[0]}")
    for url in urls[1:]:
        echo(f"  on the network:  {url}")
    names = ", ".join(aliases)
    echo(f"  model id:        {info.name}" + (f" (aliases: {names})" if names else ""))
    names = f", keys: {', '.join(keys.names)}" if keys else ""
    echo(
        "  API key:         " + (f"required (Authorization: Bearer ...{names})" if keys else "none")
    )
    echo("Press Ctrl-C to stop.")


def _setup_logging(level: str) -> None:
    """mlxrun's log lines (the access log at info, clamps at debug) on stderr."""
    import logging

    logger = logging.getLogger("mlxrun")
    if not any(getattr(h, "_mlxrun", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        handler._mlxrun = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False


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
@click.option("--api-key-file", type=click.Path(dir_okay=False), default=None,
              help="Named keys, one `name:key` a line (names appear in logs and /metrics); "
              "re-read on SIGHUP.")  # fmt: skip
@click.option("--no-auth", is_flag=True, default=False,
              help="Serve a non-loopback --host without any key (anyone who can reach it may "
              "use it).")  # fmt: skip
@click.option("--max-concurrent-per-key", type=click.IntRange(min=1), default=None,
              help="Generation requests one key may run at once (default: no limit).")  # fmt: skip
@click.option("--max-queued-per-key", type=click.IntRange(min=0), default=None,
              help="More of one key's requests that may wait for a slot before a 429 "
              "(default: as many as --max-concurrent-per-key).")  # fmt: skip
@click.option("--alias", "aliases", multiple=True,
              help="Another model id clients may use; a pattern such as 'claude-*' accepts every "
              "matching name (Claude Code asks for its own model names).")  # fmt: skip
@click.option("--context", type=click.IntRange(min=1), default=None, help="Context length.")
@click.option("--max-running", type=click.IntRange(min=1), default=16, show_default=True,
              help="Requests decoded together in one batch.")  # fmt: skip
@click.option("--cache-memory", default=None, help="Prefix-cache memory, e.g. 2GB (0 = off).")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Directory for the prefix cache's disk tier (off by default).")  # fmt: skip
@click.option("--cache-reuse", type=click.IntRange(min=0), default=0, show_default=True,
              help="Also reuse cached KV of runs of at least this many tokens that reappear "
              "after an edit mid-prompt, re-rotated to their new place (0 = off). An "
              "approximation: outputs can differ slightly from a full prefill.")  # fmt: skip
@click.option("--kv-bits", type=click.Choice(["16", "8", "4", "auto"], case_sensitive=False),
              default="16", show_default=True,
              help="KV cache precision, kept in the running batch and the prefix cache: 8 or 4 "
              "bits fit ~2x / ~3.5x the tokens; auto stays full until the KV budget fills, "
              "then moves to 8-bit.")  # fmt: skip
@click.option("--kv-group-size", type=click.Choice(["32", "64", "128"]), default="64",
              show_default=True, help="Channels per quantization group (with --kv-bits).")  # fmt: skip
@click.option("--cache-disk-size", default=None,
              help="Byte budget of the disk tier, e.g. 20GB (default 8GB; LRU beyond it).")  # fmt: skip
@click.option("--cors-origin", "cors_origins", multiple=True,
              help="Allow browser requests from this origin (repeatable; off by default).")  # fmt: skip
@click.option("--tool-parser", default=None,
              help="Tool-call format (hermes, qwen3_coder, glm45, llama3, mistral, granite, "
              "deepseek_v3, deepseek_v31, gpt_oss…); detected from the model's chat template by "
              "default.")  # fmt: skip
@click.option("--strict", is_flag=True, default=False,
              help="Reject what OpenAI rejects: unknown request fields and a max_tokens past the "
              "context (by default they are reported and ignored, or clamped).")  # fmt: skip
@click.option("--log-level", type=click.Choice(LOG_LEVELS, case_sensitive=False),
              default="info", show_default=True,
              help="info: one access line per request; debug adds max_tokens clamps.")  # fmt: skip
@click.option("-q", "--quiet", is_flag=True, default=False,
              help="No access log (same as --log-level warning).")  # fmt: skip
@click.option("--responses-dir", type=click.Path(file_okay=False), default=None,
              help="Keep stored /v1/responses responses here across restarts (memory only by "
              "default).")  # fmt: skip
@friendly_errors
def serve_cmd(
    model: str,
    host: str,
    port: int,
    api_key: str | None,
    api_key_file: str | None,
    no_auth: bool,
    max_concurrent_per_key: int | None,
    max_queued_per_key: int | None,
    aliases: tuple[str, ...],
    context: int | None,
    max_running: int,
    cache_memory: str | None,
    cache_dir: str | None,
    cache_reuse: int,
    kv_bits: str,
    kv_group_size: str,
    cache_disk_size: str | None,
    cors_origins: tuple[str, ...],
    tool_parser: str | None,
    strict: bool,
    log_level: str,
    quiet: bool,
    responses_dir: str | None,
) -> None:
    """Serve MODEL over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions…)."""
    _setup_logging("warning" if quiet else log_level)
    _check_exposure(host, bool(api_key), api_key_file, no_auth)
    cache_bytes = _cache_bytes(cache_memory)
    kv = {"kv_bits": kv_bits, "kv_group_size": int(kv_group_size)}
    disk_bytes = _disk_bytes(cache_disk_size, cache_dir)
    if tool_parser is not None:
        from mlxrun.parsing.tools import tool_format_by_name

        tool_format_by_name(tool_parser)  # an unknown name fails before the model loads
    if responses_dir is not None:
        _private_dir(responses_dir)
    sock = _bind(host, port)
    from mlxrun.engine import Engine
    from mlxrun.loader import load
    from mlxrun.safety import check_chat_template
    from mlxrun.server.app import ServerConfig

    lm, tokenizer, info = load(model, context=context)
    click.echo(f"Loading {info.name}...", err=True)
    problem = check_chat_template(tokenizer)
    if problem:  # said now, before any client gets a 400 for it
        click.echo(f"Warning: {problem}", err=True)
    _read_weights(lm)
    engine_config = _engine_config(
        tokenizer, info, max_running, cache_bytes, cache_dir, kv, disk_bytes
    )
    engine_config = dataclasses.replace(engine_config, cache_reuse=cache_reuse)
    config = ServerConfig(
        model_id=info.name,
        context_length=info.context_length,
        aliases=tuple(a for a in aliases if a != info.name),
        api_key=api_key or None,
        api_key_file=api_key_file,
        max_concurrent_per_key=max_concurrent_per_key,
        max_queued_per_key=max_queued_per_key,
        cors_origins=cors_origins,
        tool_parser=tool_parser,
        strict=strict,
        responses_dir=responses_dir,
    )
    app_parts = (Engine(lm, engine_config), config, tokenizer)
    _run(app_parts, info, host, sock)
    click.echo("Stopped.")


def _run(app_parts: tuple[Any, Any, Any], info: Any, host: str, sock: socket.socket) -> None:
    """uvicorn serving the app on `sock` until Ctrl-C / SIGTERM; the banner once it answers."""
    import uvicorn

    from mlxrun.server.app import create_app

    engine, config, tokenizer = app_parts
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

    async def on_ready() -> None:
        # The banner says "serving" once requests are answered: the engine runs and uvicorn
        # listens (it does after the lifespan's startup, which does not wait for the engine).
        while not server.started:
            await asyncio.sleep(0.01)
        urls = _base_urls(host, sock.getsockname()[1])
        _banner(info, urls, config.aliases, app.state.keys)
        if not _is_loopback(host) and not app.state.keys:
            click.echo("Warning: listening beyond this machine with no API key.", err=True)
        sys.stdout.flush()

    app = create_app(engine, config, tokenizer=tokenizer, on_fatal=on_fatal, on_ready=on_ready)
    uv_config.app = app
    _serve(server, sock, app.state.keys)
    if failed:
        raise failed[0]


def _engine_config(
    tokenizer: Any,
    info: Any,
    max_running: int,
    cache_bytes: int | None,
    cache_dir: str | None,
    kv: dict | None = None,
    disk_bytes: int | None = None,
) -> Any:
    from mlxrun.engine import EngineConfig

    return EngineConfig(
        max_running=max_running,
        # The tokenizer's set adds the chat template's end-of-turn tokens to config.json's eos.
        eos_token_ids=tuple(sorted(tokenizer.eos_token_ids)),
        namespace=info.name,
        context_length=info.context_length,
        **(kv or {}),
        # 0 turns the disk tier off, like --cache-memory 0 the memory tier.
        cache_dir=None if disk_bytes == 0 else cache_dir,
        **({} if cache_bytes is None else {"cache_memory_bytes": cache_bytes}),
        **({} if not disk_bytes else {"disk_cache_bytes": disk_bytes}),
    )


def _read_weights(model: Any) -> None:
    """Page the (lazily mapped) weights in on this thread: MLX ties lazy arrays to the stream of
    the thread that made them, and the engine starts on a worker thread."""
    import mlx.core as mx

    mx.eval(model.parameters())


def _serve(server: Any, sock: socket.socket, keys: Any = None) -> None:
    # uvicorn replays the signal that stopped it once it has shut down; with no-op handlers that
    # replay does nothing, so Ctrl-C / SIGTERM end in "Stopped." and exit status 0.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    if keys is not None and keys.file is not None and hasattr(signal, "SIGHUP"):
        # SIGHUP re-reads --api-key-file: keys are added and revoked without a restart.
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, lambda *_: keys.reload())
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
        sys.stdout.flush()


if __name__ == "__main__":
    serve_cmd()
