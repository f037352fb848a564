"""The `mlxrun` command: a thin click group.

Command modules import only click at top level and do their heavy imports (mlx, transformers, …)
inside the command, so `mlxrun --help` stays fast.
"""

from __future__ import annotations

import click

from mlxrun import __version__
from mlxrun.cli.common import debug_enabled, friendly_errors, report_error  # noqa: F401


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mlxrun")
def main() -> None:
    """mlxrun: run LLMs locally on Apple Silicon with MLX.

    Convert Hub checkpoints to 4-bit MLX weights, generate and chat in the terminal, and serve an
    OpenAI-compatible API for your editor.
    """


def _register() -> None:
    from mlxrun.cli.chat import chat_cmd
    from mlxrun.cli.convert import convert_cmd
    from mlxrun.cli.doctor import doctor_cmd
    from mlxrun.cli.generate import generate_cmd
    from mlxrun.cli.store import list_cmd, pull_cmd, rm_cmd, show_cmd
    from mlxrun.server.cli import serve_cmd

    for cmd in (
        convert_cmd,
        pull_cmd,
        list_cmd,
        show_cmd,
        rm_cmd,
        generate_cmd,
        chat_cmd,
        serve_cmd,
        doctor_cmd,
    ):
        main.add_command(cmd)


_register()
