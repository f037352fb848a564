"""`mlxrun launch`: build the mlx.launch call for a distributed serve/generate, after checking
that every host holds the same model.

mlx.launch does the real work (ssh to each host, hand out ranks, wire the ring or JACCL
backend); this is a thin wrapper around it. Before starting anything it resolves MODEL here,
passes the absolute path on (each host reads the model from its own disk, at the same path) and
compares the model's file fingerprint on every host, naming the host that differs: ranks that
hold different weights would otherwise compute nonsense together without any error.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from mlxrun.errors import DistributedError, InvalidRequestError
from mlxrun.fingerprint import model_fingerprint

LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
COMMANDS = ("serve", "generate")
SSH_TIMEOUT_S = 60
# mlx.launch's own entry point, for environments where its console script is not on PATH.
_LAUNCH_MAIN = "import sys; from mlx._distributed_utils.launch import main; sys.exit(main())"
# mlx.launch exits 0 whatever its ranks did (MLX 0.32) and only logs a failed rank on stderr.
_RANK_FAILED = re.compile(r"Node with rank (\d+) (?:exited with code (-?\d+)|was killed)")

# (host, model path) -> that host's fingerprint of the model, or None when it has none there.
HostCheck = Callable[[str, Path], "str | None"]


def launcher_argv() -> list[str]:
    """How to run mlx.launch: the console script beside this Python, on PATH, or its module."""
    beside = Path(sys.executable).with_name("mlx.launch")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("mlx.launch")
    return [found] if found else [sys.executable, "-c", _LAUNCH_MAIN]


def hosts_of(hosts: str | None, hostfile: str | None, repeat: int = 1) -> list[str]:
    """The ssh host of each rank, from --hosts H1,H2 or an mlx.launch hostfile."""
    if hostfile:
        try:
            data = json.loads(Path(hostfile).read_text())
            entries = data["hosts"] if isinstance(data, dict) else data
            names = [str(h["ssh"]) for h in entries]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InvalidRequestError(
                f"cannot read hostfile {hostfile}: {e}", param="hostfile",
                hint='Write it as mlx.launch expects: {"hosts": [{"ssh": "mac1", "ips": [...]}]}.',
            ) from None  # fmt: skip
    else:
        names = [h.strip() for h in (hosts or "").split(",") if h.strip()]
    ranks = [h for h in names for _ in range(max(1, repeat))]
    if len(ranks) < 2:
        raise InvalidRequestError(
            f"a distributed run needs at least 2 ranks, got {len(ranks)}",
            param="hosts",
            hint="Pass --hosts H1,H2 (or -n 2 for two local ranks).",
        )
    return ranks


def is_local(host: str) -> bool:
    return host in LOCAL_HOSTS or host == socket.gethostname()


def local_check(host: str, path: Path) -> str | None:
    try:
        return model_fingerprint(path)
    except OSError:
        return None


def ssh_check(host: str, path: Path) -> str | None:
    """The fingerprint computed on `host` over ssh, by the same Python path as here (mlx.launch
    assumes one layout on every host too)."""
    remote = shlex.join([sys.executable, "-m", "mlxrun.fingerprint", str(path)])
    try:
        done = subprocess.run(
            ["ssh", "-o", "BatchMode=yes", host, remote],
            capture_output=True, text=True, timeout=SSH_TIMEOUT_S,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DistributedError(f"cannot reach host {host} over ssh: {e}") from None
    if done.returncode == 1:
        return None
    if done.returncode != 0:
        raise DistributedError(
            f"cannot check the model on host {host}: ssh exited {done.returncode}: "
            f"{done.stderr.strip()[-300:]}",
            hint=f"Check that `ssh {host}` works without a password and mlxrun is installed at "
            f"{sys.executable} there.",
        )
    return done.stdout.strip()


def default_check(host: str, path: Path) -> str | None:
    return local_check(host, path) if is_local(host) else ssh_check(host, path)


def check_hosts(hosts: Sequence[str], path: Path, check: HostCheck = default_check) -> str:
    """The model's fingerprint, the same on every host; DistributedError naming a host that has
    no model at `path` or a different one (rank 0's host is the reference)."""
    seen: dict[str, str | None] = {}
    for host in hosts:
        if host not in seen:
            seen[host] = check(host, path)
    first = hosts[0]
    ref = seen[first]
    if ref is None:
        raise DistributedError(f"host {first} (rank 0) has no model at {path}")
    for host, fp in seen.items():
        if fp is None:
            raise DistributedError(
                f"host {host} has no model at {path}",
                hint=f"Copy the model to {path} on {host} (e.g. rsync -a {path}/ {host}:{path}/).",
            )
        if fp != ref:
            raise DistributedError(
                f"host {host} holds a different model at {path} than {first} "
                f"(fingerprint {fp} vs {ref})",
                hint=f"Copy the model from {first} to {host} so both hold the same files.",
            )
    return ref


def split_command(command: Sequence[str]) -> tuple[str, str, list[str]]:
    """(subcommand, MODEL, the rest) of `serve MODEL ...` / `generate MODEL ...`."""
    if len(command) < 2 or command[0] not in COMMANDS or command[1].startswith("-"):
        raise InvalidRequestError(
            f"expected `serve MODEL ...` or `generate MODEL ...`, got {shlex.join(command)!r}",
            param="command",
            hint="Put the subcommand and the model first, e.g. `mlxrun launch --hosts H1,H2 "
            "serve MODEL --port 8080`.",
        )
    return command[0], command[1], list(command[2:])


def build_argv(
    command: Sequence[str],
    model_path: Path,
    *,
    hosts: str | None = None,
    hostfile: str | None = None,
    repeat: int = 1,
    backend: str | None = None,
    starting_port: int | None = None,
) -> list[str]:
    """The mlx.launch call that runs `command` on every rank, with MODEL as `model_path`."""
    sub, _, rest = split_command(command)
    argv = launcher_argv()
    argv += ["--hostfile", hostfile] if hostfile else ["--hosts", hosts or ""]
    if repeat > 1:
        argv += ["-n", str(repeat)]
    if backend:
        argv += ["--backend", backend]
    if starting_port:
        argv += ["--starting-port", str(starting_port)]
    return [*argv, "--", sys.executable, "-m", "mlxrun", sub, str(model_path), *rest]


def run_launcher(argv: Sequence[str]) -> int:
    """Run mlx.launch, passing its output through; non-zero when any rank failed (mlx.launch
    itself exits 0 then, so its per-rank log lines are the only record)."""
    failed: list[str] = []
    # Its own process group, which a stop signal here goes to whole: mlx.launch does not pass
    # signals on, and ranks outliving it would keep serving.
    proc = subprocess.Popen(list(argv), stderr=subprocess.PIPE, text=True, errors="replace",
                            start_new_session=True)  # fmt: skip
    stopped: list[int] = []

    def forward(sig: int, _frame: object) -> None:
        stopped.append(sig)
        os.killpg(proc.pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        rc = _follow(proc, failed)
        return 128 + stopped[0] if stopped else rc  # a stop asked for is not a failed rank
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _follow(proc: subprocess.Popen, failed: list[str]) -> int:
    """Pass mlx.launch's stderr through, noting the ranks it reports failed."""
    assert proc.stderr is not None
    for line in proc.stderr:
        sys.stderr.write(line)
        sys.stderr.flush()
        m = _RANK_FAILED.search(line)
        if m and m.group(2) != "0":
            failed.append(f"rank {m.group(1)}" + (f" (exit {m.group(2)})" if m.group(2) else ""))
    rc = proc.wait()
    if failed:
        print(f"distributed run failed: {', '.join(failed)}", file=sys.stderr)
        return rc or 1
    return rc
