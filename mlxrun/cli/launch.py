"""`mlxrun launch --hosts H1,H2 serve MODEL ...`: check the hosts, print the mlx.launch call,
run it (see mlxrun.launch)."""

from __future__ import annotations

import shlex
import sys

import click

from mlxrun.cli.common import friendly_errors


@click.command(
    "launch",
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
)
@click.option("--hosts", default=None, help="Comma-separated hosts, one rank each (IPs for the ring backend).")  # fmt: skip
@click.option("--hostfile", type=click.Path(dir_okay=False), default=None, help="An mlx.launch hostfile (ssh names, IPs, RDMA devices, backend).")  # fmt: skip
@click.option("-n", "--repeat", type=click.IntRange(min=1), default=1, show_default=True, help="Ranks per host (e.g. -n 2 on 127.0.0.1 to try it on one machine).")  # fmt: skip
@click.option("--backend", type=click.Choice(["ring", "jaccl", "jaccl-ring"]), default=None, help="mlx.launch backend [default: the hostfile's, else ring].")  # fmt: skip
@click.option("--starting-port", type=int, default=None, help="First TCP port of the ring backend (mlx.launch's default: 32323).")  # fmt: skip
@click.option("--dry-run", is_flag=True, help="Check the hosts and print the call, but do not run it.")  # fmt: skip
@click.argument("command", nargs=-1, type=click.UNPROCESSED, required=True)
@friendly_errors
def launch_cmd(
    hosts: str | None,
    hostfile: str | None,
    repeat: int,
    backend: str | None,
    starting_port: int | None,
    dry_run: bool,
    command: tuple[str, ...],
) -> None:
    """Run `serve MODEL ...` or `generate MODEL ...` across machines with mlx.launch.

    \b
    Every host must hold the model at the same path; this checks that their files match first.
    Examples:
      mlxrun launch --hosts 127.0.0.1 -n 2 generate MODEL -p "def add(a, b):"
      mlxrun launch --hostfile hosts.json serve MODEL --port 8080
    """
    from mlxrun import launch, store
    from mlxrun.errors import InvalidRequestError

    if bool(hosts) == bool(hostfile):
        raise InvalidRequestError(
            "pass exactly one of --hosts and --hostfile", param="hosts",
            hint="e.g. --hosts 10.0.0.1,10.0.0.2",
        )  # fmt: skip
    ranks = launch.hosts_of(hosts, hostfile, repeat)
    _, model, _ = launch.split_command(command)
    path = store.resolve_model(model).resolve()
    fingerprint = launch.check_hosts(ranks, path)
    argv = launch.build_argv(command, path, hosts=hosts, hostfile=hostfile, repeat=repeat,
                             backend=backend, starting_port=starting_port)  # fmt: skip
    click.echo(
        f"launch: {len(ranks)} ranks on {', '.join(dict.fromkeys(ranks))}; model {path} "
        f"(fingerprint {fingerprint}) matches on every host",
        err=True,
    )
    click.echo(shlex.join(argv))
    if dry_run:
        return
    sys.stdout.flush()
    sys.exit(launch.run_launcher(argv))
