"""Error reporting shared by every command: one line and the next step, never a traceback."""

from __future__ import annotations

import functools
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

import click

from mlxrun.errors import MlxrunError


def debug_enabled() -> bool:
    return os.environ.get("MLXRUN_DEBUG", "") not in ("", "0", "false", "no")


def report_error(exc: BaseException) -> int:
    """Print one line plus the next step; a traceback only with MLXRUN_DEBUG=1. Returns exit code."""
    if debug_enabled():
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    if isinstance(exc, MlxrunError):
        hint = f" ({exc.hint})" if exc.hint else ""
        click.echo(f"Error: {exc.message}{hint}", err=True)
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        click.echo("Interrupted.", err=True)
        return 130
    click.echo(
        f"Error: internal error: {type(exc).__name__}: {exc} "
        "(set MLXRUN_DEBUG=1 for a traceback and report it)",
        err=True,
    )
    return 1


def friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn any exception raised by a command into one line on stderr and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - the CLI edge
            sys.exit(report_error(exc))

    return wrapper
