"""One model across several processes or machines (ranks), on MLX's own engine.

`mlx.launch` starts the same command on every host and tells each process its rank through the
environment (MLX_RANK plus MLX_HOSTFILE for the ring backend, MLX_JACCL_COORDINATOR for JACCL).
`init_world()` joins that group; a process not started that way gets None and runs alone.

Every rank runs the same forward passes in the same order: the model's collectives (all_sum in
tensor parallel, send/recv in pipeline parallel) pair up only if they do. So anything that can
differ between ranks (a sampled token, the engine's choice of batch) is decided on rank 0 and
broadcast; `broadcast` is an all_sum where every other rank adds zeros, which keeps it inside
the lazy graph so pipelined decoding still overlaps.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from mlxrun.errors import DistributedError

PARALLEL_MODES = ("tensor", "pipeline")
# Environment variables mlx.launch sets per backend (see mlx/_distributed_utils/launch.py).
_BACKEND_ENV = (("MLX_JACCL_COORDINATOR", "jaccl"), ("MLX_HOSTFILE", "ring"))


@dataclass(frozen=True)
class World:
    """This process's place in a distributed run. `parallel` is "auto" until the model is
    sharded, then the mode actually used."""

    rank: int
    size: int
    backend: str
    parallel: str = "auto"
    group: Any = field(default=None, compare=False, repr=False)

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return f"distributed: {self.size} ranks, {self.parallel} parallel ({self.backend})"

    def with_mode(self, parallel: str) -> World:
        return replace(self, parallel=parallel)


_current: World | None = None


def current() -> World | None:
    """The world this process joined (None: a single process). One per process, like MLX's."""
    return _current


def set_current(world: World | None) -> None:
    global _current
    _current = world


def launched(env: Mapping[str, str] | None = None) -> bool:
    """Whether mlx.launch (or an equivalent) started this process as one rank of several."""
    found: Mapping[str, str] = os.environ if env is None else env
    return "MLX_RANK" in found


def backend_from_env(env: Mapping[str, str] | None = None) -> str:
    found: Mapping[str, str] = os.environ if env is None else env
    return next((name for var, name in _BACKEND_ENV if found.get(var)), "ring")


def check_mode(parallel: str | None) -> str:
    if parallel is None:
        return "auto"
    if parallel not in (*PARALLEL_MODES, "auto"):
        raise DistributedError(
            f"--parallel must be one of {', '.join(PARALLEL_MODES)}, got {parallel!r}",
            hint="Pass --parallel tensor or --parallel pipeline.",
        )
    return parallel


def init_world(parallel: str | None = None) -> World | None:
    """Join the distributed group mlx.launch set up; None when this is a single process.

    `--parallel` without a launch is refused rather than ignored: the user meant to split the
    model and would otherwise silently run it whole.
    """
    mode = check_mode(parallel)
    if not launched():
        if parallel is not None:
            raise DistributedError(
                f"--parallel {parallel} needs several ranks, but this process was not started "
                "by mlx.launch",
                hint="Start it with `mlxrun launch --hosts H1,H2 ...` or `mlx.launch`.",
            )
        return None
    import mlx.core as mx

    backend = backend_from_env()
    try:
        group = mx.distributed.init(strict=True, backend=backend)
    except RuntimeError as e:
        raise DistributedError(f"cannot join the {backend} group: {e}") from None
    if group.size() == 1:
        return None
    world = World(group.rank(), group.size(), backend, mode, group)
    set_current(world)
    return world


def broadcast(x: Any, world: World | None = None) -> Any:
    """Rank 0's value of `x` on every rank (lazy). Others pass an array of the same shape/dtype."""
    import mlx.core as mx

    world = world or _current
    if world is None:
        return x
    # Zeros that still depend on x: the graph behind x (a forward pass and its own collectives)
    # must run on every rank, in the same order, before this all_sum pairs up.
    mine = x if world.leader else mx.depends(mx.zeros_like(x), x)
    return mx.distributed.all_sum(mine, group=world.group)


def shared_sampler(sampler: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Sample on rank 0 only and hand every rank its tokens (identity when alone): ranks whose
    random state or float rounding differ must still feed the same token to the next step."""
    if _current is None:
        return sampler
    return lambda logprobs: broadcast(sampler(logprobs))


def broadcast_ints(values: Sequence[int] | None, world: World | None = None) -> list[int]:
    """Rank 0's list of ints on every rank (others pass None); blocks until all ranks call it."""
    import mlx.core as mx

    world = world or _current
    if world is None:
        return list(values or [])
    n = broadcast(mx.array([len(values or [])], dtype=mx.int32), world)
    length = int(n.item())
    if length == 0:
        return []
    data = mx.array(list(values), dtype=mx.int64) if world.leader and values else None
    out = broadcast(data if data is not None else mx.zeros((length,), mx.int64), world)
    return [int(v) for v in out.tolist()]


def broadcast_bytes(data: bytes | None, world: World | None = None) -> bytes:
    """Rank 0's bytes on every rank (others pass None); blocks until all ranks call it."""
    import mlx.core as mx
    import numpy as np

    world = world or _current
    if world is None:
        return data or b""
    n = broadcast(mx.array([len(data or b"")], dtype=mx.int32), world)
    length = int(n.item())
    if length == 0:
        return b""
    if world.leader and data:
        arr = mx.array(np.frombuffer(data, dtype=np.uint8))
    else:
        arr = mx.zeros((length,), mx.uint8)
    return bytes(np.array(broadcast(arr, world), copy=False))


def barrier(world: World | None = None) -> None:
    """Wait until every rank gets here (a tiny all_sum on the CPU stream)."""
    import mlx.core as mx

    world = world or _current
    if world is not None:
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=world.group, stream=mx.cpu))


def announce(world: World | None) -> None:
    """The one stderr line that says this command runs distributed (rank 0 only)."""
    if world is not None and world.leader:
        print(world.describe(), file=sys.stderr, flush=True)


def quiet_followers(world: World | None) -> None:
    """Only rank 0 writes to stdout: mlx.launch merges every rank's stdout into one, so the
    other ranks' copies of the same text go to /dev/null."""
    if world is None or world.leader:
        return
    sys.stdout.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
