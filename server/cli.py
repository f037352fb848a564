"""`mlxrun serve MODEL`: an OpenAI-compatible HTTP server for one model."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import click

from mlxrun.cli.common import friendly_errors
from mlxrun.cli.engine_options import cache_overrides
from mlxrun.cli.speculation import speculation_options, speculation_overrides

if TYPE_CHECKING:
    import uvicorn
    from starlette.applications import Starlette

    from mlxrun.server.models_pool import ModelPool
    from mlxrun.server.state import ServerConfig

LOG_LEVELS = ("debug", "info", "warning", "error")
GRACEFUL_SHUTDOWN_S = 5  # in-flight requests get this long to finish; the rest are aborted


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
@click.argument("models", nargs=-1)
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
@click.option("--memory-budget", default=None,
              help="Memory all loaded models share (weights, KV, prefix cache), e.g. 24GB; "
              "loading past it unloads the least recently used idle model. Default: the "
              "machine's budget (see `mlxrun doctor`).")  # fmt: skip
@click.option("--max-loaded", type=click.IntRange(min=1), default=None,
              help="Most models in memory at once (default: as many as the budget holds).")  # fmt: skip
@click.option("--keep-alive", default="5m", show_default=True,
              help="How long an idle model stays loaded: a duration (30s, 5m, 1h), -1 for "
              "ever, 0 to unload after each request. Per request: Ollama's keep_alive or the "
              "X-Mlxrun-Keep-Alive header.")  # fmt: skip
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
@speculation_options
@click.option("--parallel", type=click.Choice(["tensor", "pipeline"]), default=None,
              help="Under mlx.launch: split the model by tensor or pipeline [default: tensor if "
              "the architecture can].")  # fmt: skip
@click.option("--step-timeout", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
              help="Under mlx.launch: seconds one engine step may wait on the other ranks "
              "before requests fail with 503.")  # fmt: skip
@friendly_errors
def serve_cmd(
    models: tuple[str, ...],
    host: str,
    port: int,
    api_key: str | None,
    api_key_file: str | None,
    no_auth: bool,
    max_concurrent_per_key: int | None,
    max_queued_per_key: int | None,
    aliases: tuple[str, ...],
    context: int | None,
    memory_budget: str | None,
    max_loaded: int | None,
    keep_alive: str,
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
    speculate: str,
    draft: str | None,
    num_speculative_tokens: int,
    parallel: str | None,
    step_timeout: float,
) -> None:
    """Serve MODELS over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions…),
    and Anthropic's and Ollama's. The first model is the default and loads at once; a request's
    "model" picks another, loaded on first use. With no MODELS, every stored model is servable."""
    _setup_logging("warning" if quiet else log_level)
    _check_exposure(host, bool(api_key), api_key_file, no_auth)
    kv: dict[str, Any] = {"kv_bits": kv_bits, "kv_group_size": int(kv_group_size)}
    caches = cache_overrides(cache_memory, cache_dir, cache_disk_size)
    if tool_parser is not None:
        from mlxrun.parsing.tools import tool_format_by_name

        tool_format_by_name(tool_parser)  # an unknown name fails before the model loads
    if responses_dir is not None:
        _private_dir(responses_dir)
    from mlxrun import distributed
    from mlxrun.engine import EngineConfig
    from mlxrun.server import cli_pool
    from mlxrun.server.app import ServerConfig
    from mlxrun.server.models_pool import ModelPool

    world = distributed.init_world(parallel)
    if world is not None:  # one model across machines (mlx.launch): no pool
        from mlxrun.server.cli_distributed import serve_distributed

        serve_distributed(
            world, models, host, port, context, step_timeout,
            dict(max_running=max_running, cache_reuse=cache_reuse, **kv, **caches),
            dict(aliases=aliases, api_key=api_key or None, api_key_file=api_key_file,
                 max_concurrent_per_key=max_concurrent_per_key,
                 max_queued_per_key=max_queued_per_key, cors_origins=cors_origins,
                 tool_parser=tool_parser, strict=strict, responses_dir=responses_dir),
        )  # fmt: skip
        return

    names, preload = cli_pool.pick_models(models)
    specs = cli_pool.build_specs(names, aliases, context)
    if draft is not None:  # the default model's draft; checked against its tokenizer now
        specs[0] = dataclasses.replace(specs[0], draft=draft)
        _check_draft(specs[0].path, draft, context)
    spec = speculation_overrides(speculate, num_speculative_tokens)
    engine_config = EngineConfig(
        max_running=max_running, cache_reuse=cache_reuse, **kv, **caches, **spec
    )
    settings = cli_pool.pool_settings(memory_budget, max_loaded, keep_alive, engine_config, preload)
    sock = _bind(host, port)
    pool = ModelPool(specs, settings)
    if preload:
        click.echo(f"Loading {specs[0].name}...", err=True)
    config = ServerConfig(
        model_id=specs[0].name,
        context_length=specs[0].context or 0,
        api_key=api_key or None,
        api_key_file=api_key_file,
        max_concurrent_per_key=max_concurrent_per_key,
        max_queued_per_key=max_queued_per_key,
        cors_origins=cors_origins,
        tool_parser=tool_parser,
        strict=strict,
        responses_dir=responses_dir,
    )
    _run(pool, config, host, sock)
    click.echo("Stopped.")


def _check_draft(target: str, draft: str, context: int | None) -> None:
    """A draft with another tokenizer stops serve before it starts (IncompatibleDraftError)."""
    from mlxrun.draft import load_draft
    from mlxrun.tokenizer import load_tokenizer

    load_draft(draft, load_tokenizer(Path(target)), context=context)


def _run(pool: ModelPool, config: ServerConfig, host: str, sock: socket.socket) -> None:
    """uvicorn serving the pool's app on `sock` until Ctrl-C / SIGTERM."""
    from mlxrun.server.app import create_app
    from mlxrun.server.cli_pool import banner

    def announce(app: Starlette, urls: list[str]) -> None:
        banner(pool, urls, app.state.keys)
        if not _is_loopback(host) and not app.state.keys:
            click.echo("Warning: listening beyond this machine with no API key.", err=True)

    def build(on_fatal: Callable[[BaseException], None], on_ready: Callable[[], Any]) -> Starlette:
        return create_app(None, config, tokenizer=None, on_fatal=on_fatal, on_ready=on_ready,
                          pool=pool)  # fmt: skip

    run_uvicorn(build, host, sock, announce)


def run_uvicorn(
    build: Callable[[Callable[[BaseException], None], Callable[[], Any]], Starlette],
    host: str,
    sock: socket.socket,
    announce: Callable[[Starlette, list[str]], None],
    on_stop_signal: Callable[[], None] | None = None,
) -> None:
    """uvicorn serving `build(on_fatal, on_ready)` on `sock` until Ctrl-C / SIGTERM. `announce`
    runs once requests are answered (the engine runs and uvicorn listens, which it does after
    the lifespan's startup, which does not wait for the engine); `on_stop_signal` runs first
    when a stop signal arrives. A fatal error (the engine failed to start) is raised here."""
    import uvicorn

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
        announce(app, _base_urls(host, sock.getsockname()[1]))
        sys.stdout.flush()

    app = build(on_fatal, on_ready)
    uv_config.app = app
    if on_stop_signal is not None:
        handle_exit = server.handle_exit

        def stop_then_exit(sig: int, frame: FrameType | None) -> None:
            on_stop_signal()
            handle_exit(sig, frame)

        server.handle_exit = stop_then_exit  # type: ignore[method-assign]
    _serve(server, sock, app.state.keys)
    if failed:
        raise failed[0]


def _serve(server: uvicorn.Server, sock: socket.socket, keys: Any = None) -> None:
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
