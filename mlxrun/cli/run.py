"""`mlxrun run MODEL [PROMPT]` (chat, or one reply to PROMPT, as `ollama run`), `mlxrun ps` (what
a running server has loaded), and the default model of `serve` / `chat` when none is named."""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from typing import Any

import click

from mlxrun.cli.common import friendly_errors

PULL_HINT = "Get one with `mlxrun pull Qwen/Qwen2.5-Coder-1.5B-Instruct` (or `mlxrun convert`)."
DEFAULT_SERVER = "http://127.0.0.1:8080"


def stored_names() -> list[str]:
    from mlxrun import store

    return [m.name for m in store.list_models()]


def default_model() -> str:
    """The one stored model, for commands run without a model name."""
    from mlxrun.errors import InvalidRequestError, ModelNotFoundError

    names = stored_names()
    if not names:
        raise ModelNotFoundError("no model given and none in the store", hint=PULL_HINT)
    if len(names) > 1:
        raise InvalidRequestError(
            f"no model given and the store has {len(names)}: {', '.join(names)}",
            param="model",
            hint="Name the one to use.",
        )
    return names[0]


@click.command("run")
@click.argument("model")
@click.argument("prompt", required=False)
@click.option("--context", type=int, default=None, help="Context length [default: models.toml's, else the model's].")  # fmt: skip
@click.option("--system", default=None, help="System message.")
@friendly_errors
def run_cmd(model: str, prompt: str | None, context: int | None, system: str | None) -> None:
    """Chat with MODEL, or with PROMPT print one reply and exit (as `ollama run`). Context and
    default sampling come from models.toml when it names the model."""
    from mlxrun.cli.chat import chat_cmd
    from mlxrun.cli.generate import generate_cmd
    from mlxrun.model_settings import load_settings
    from mlxrun.store import default_name

    own = load_settings().get(default_name(model))
    sampling = dict(own.sampling) if own else {}
    context = context or (own.context if own else None)
    ctx = click.get_current_context()
    keys = ("temperature", "top_p", "top_k", "min_p", "seed", "max_tokens")
    if prompt is None:
        picked = {k: sampling.get(k) for k in keys}
        ctx.invoke(chat_cmd, model=model, system=system, context=context, force=False, **picked)
        return
    extra = ("repetition_penalty", "presence_penalty", "frequency_penalty")
    picked = {k: sampling.get(k) for k in (*keys, *extra)}
    if picked["temperature"] is None:
        picked.pop("temperature")  # generate's own default
    ctx.invoke(generate_cmd, model=model, prompt=prompt, chat=True, system=system,
               context=context, force=False, stop=(), **picked)  # fmt: skip


def _until(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds > 3e9:
        return "Forever"
    if seconds < 0:
        return "now"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


def _size(n: int) -> str:
    from mlxrun.errors import format_size

    return format_size(n)


@click.command("ps")
@click.option("--url", envvar="MLXRUN_URL", default=DEFAULT_SERVER, show_default=True,
              help="The running `mlxrun serve` (or set MLXRUN_URL).")  # fmt: skip
@click.option("--api-key", envvar="MLXRUN_API_KEY", default=None, help="Its API key, if any.")
@click.option("--json", "as_json", is_flag=True, help="Print the server's answer as JSON.")
@friendly_errors
def ps_cmd(url: str, api_key: str | None, as_json: bool) -> None:
    """List the models a running server has loaded: memory, last use, when each unloads."""
    from mlxrun.errors import MlxrunError

    request = urllib.request.Request(url.rstrip("/") + "/api/ps")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=10) as r:  # noqa: S310 - a user-given URL
            body: dict[str, Any] = json.load(r)
    except urllib.error.HTTPError as e:
        raise MlxrunError(
            f"{url} answered {e.code}", hint="Pass --api-key if it needs one."
        ) from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise MlxrunError(f"no mlxrun server at {url} ({reason})",
                          hint="Start one with `mlxrun serve`, or pass --url.") from None  # fmt: skip
    if as_json:
        click.echo(json.dumps(body, indent=2))
        return
    _print_ps(body.get("models", []))


def _print_ps(models: list[dict[str, Any]]) -> None:
    from datetime import datetime, timezone

    rows = [("NAME", "MEMORY", "RUNNING", "IDLE", "UNLOADS IN")]
    now = datetime.now(timezone.utc)
    for m in models:
        own = m.get("mlxrun", {})
        expires = datetime.fromisoformat(m["expires_at"].replace("Z", "+00:00"))
        running = own.get("running", 0)
        idle = "-" if running else _until(own.get("idle_seconds", 0.0))
        rows.append((m["name"], _size(own.get("memory_bytes", m.get("size_vram", 0))),
                     str(running), idle, _until((expires - now).total_seconds())))  # fmt: skip
    if len(rows) == 1:
        click.echo("No models loaded.")
        return
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
