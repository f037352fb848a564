"""The engine across ranks: rank 0 decides, every rank runs the same steps.

Each rank holds a shard of the model, so every forward pass is a collective: all ranks must run
the same passes, over the same batch, in the same order. `MirroredEngine` keeps them in step by
routing everything that changes the engine's state through rank 0's command queue: submits
(which a single-process engine registers on the caller's thread) become commands too, and at
each loop turn rank 0 broadcasts the commands it applies; the other ranks apply the same list at
the same point of their loop. The engine is otherwise deterministic in its inputs (the
scheduler is pure bookkeeping; prefix-cache hits and evictions follow the same requests), and:

- sampled tokens come from rank 0 (mlxrun.distributed.broadcast, in batch.step), so grammar
  constraints and seeds only matter there: followers get requests without their constraint;
- the KV capacity rank 0 computed is used everywhere (free memory differs between hosts);
- prefix pins (a time-to-live on one host's clock) and the disk tier are off;
- a digest of each step's plan is compared across ranks, so a divergence fails loudly instead of
  pairing up mismatched collectives.

Failure: a peer that dies breaks the next collective (MLX raises), one that hangs is caught by
a watchdog after `step_timeout_s`; either way rank 0 fails every open request with
RankFailedError (a 503 from the server) instead of hanging it.
"""

from __future__ import annotations

import hashlib
import pickle
import queue
import threading
import time
from dataclasses import replace
from typing import Any

from mlxrun import distributed
from mlxrun.batch import deliver
from mlxrun.distributed import World
from mlxrun.engine import Engine, EngineConfig, Request
from mlxrun.engine_commands import Abort, Stop
from mlxrun.errors import MlxrunError, RankFailedError, UnsupportedModelError
from mlxrun.scheduler import Scheduler

STEP_TIMEOUT_S = 30.0
# After a stop signal a stuck step fails this fast: mlx.launch signals rank 0 when another rank
# died, and the open requests should get their 503 before the server closes its connections.
STOPPING_TIMEOUT_S = 1.0
_WATCH_INTERVAL_S = 0.25


class _NullSink:
    """Where a follower's events go: the client talks to rank 0 only."""

    loop = None
    finished = False

    def put(self, item: Any) -> None:
        pass

    def abort(self) -> None:
        pass


class _Submit:
    """A request waiting for rank 0's engine thread (and its broadcast to the other ranks)."""

    def __init__(self, request: Request, sink: Any):
        self.request, self.sink = request, sink


def mirrored_config(config: EngineConfig) -> EngineConfig:
    """What differs when mirrored: no disk tier, no pinned prefixes (see module doc)."""
    return replace(config, cache_dir=None, max_pinned_prefixes=0)


class MirroredEngine(Engine):
    def __init__(self, model: Any, config: EngineConfig, world: World, *,
                 step_timeout_s: float = STEP_TIMEOUT_S):  # fmt: skip
        if world.parallel == "pipeline":
            # The engine's lazy graphs (batched probes, prefill chunks) are evaluated in an order
            # that can differ between ranks, and a pipeline's send/recv pair up only in order.
            raise UnsupportedModelError(
                "the engine runs across machines in tensor parallel only: a pipeline's send and "
                "recv pair up in evaluation order, which its lazy graphs do not keep the same "
                "on every rank",
                hint="Drop --parallel pipeline (tensor parallel is the default when the "
                "architecture has shard()).",
            )
        super().__init__(model, mirrored_config(config))
        self.world = world
        self.step_timeout_s = step_timeout_s
        self._pending: dict[str, Any] = {}  # request id -> sink, submitted but not yet applied
        self._busy_since: float | None = None  # when the current collective work began
        self._failed = threading.Event()
        self._stopping = False

    # -- rank 0: callers ---------------------------------------------------------------------

    def _add(self, request: Request, sink: Any) -> None:
        if self._error is not None:
            raise self._error
        if self._thread is None or not self._thread.is_alive():
            raise RuntimeError("the engine is not running (call start())")
        self._make_seq(request, sink)  # bad input fails here, on the caller's thread
        self._pending[request.id] = sink
        self._commands.put(_Submit(request, sink))  # type: ignore[arg-type]

    def stopping(self) -> None:
        """A stop signal arrived (Ctrl-C, or mlx.launch tearing the run down after a rank
        died): a step still waiting on the other ranks now fails within STOPPING_TIMEOUT_S."""
        self._stopping = True

    def shutdown(self) -> None:
        if self._failed.is_set():
            return  # the engine thread may sit in a collective that never returns: leave it
        super().shutdown()

    # -- setup and the loop (every rank) -----------------------------------------------------

    def _setup(self) -> None:
        super()._setup()
        assert self._scheduler is not None
        mine = self._scheduler.config.kv_capacity_tokens or 0
        leader = distributed.broadcast_ints([mine] if self.world.leader else None, self.world)[0]
        if leader != mine:  # rank 0's figure, so admission decisions agree
            self._kv.set_capacity(leader or None)
            cfg = replace(self._scheduler.config, kv_capacity_tokens=leader or None)
            self._scheduler = Scheduler(cfg)
        if self.world.leader:
            threading.Thread(target=self._watch, name="mlxrun-watchdog", daemon=True).start()

    def _run(self) -> None:
        super()._run()
        if self._error is not None:
            self._fail(self._error)

    def _drain(self, block: bool) -> bool:
        if self.world.leader:
            taken = self._take(block)
            wire = [self._wire(c) for c in taken]
            self._collective(lambda: distributed.broadcast_bytes(pickle.dumps(wire), self.world))
        else:
            wire = pickle.loads(distributed.broadcast_bytes(None, self.world))
            taken = wire
        for local, sent in zip(taken, wire, strict=True):
            if not self._apply(local, sent):
                return False
        return True

    def _step(self) -> None:
        self._collective(super()._step)

    def _plan(self) -> Any:
        plan = super()._plan()
        digest = _plan_digest(plan, self._batch.ids)
        theirs = distributed.broadcast_ints(digest if self.world.leader else None, self.world)
        if theirs != digest:
            raise RankFailedError(
                f"rank {self.world.rank} planned a different step than rank 0 (engine state "
                "diverged)", rank=self.world.rank,
            )  # fmt: skip
        return plan

    # -- commands ----------------------------------------------------------------------------

    def _take(self, block: bool) -> list[Any]:
        out: list[Any] = []
        while True:
            try:
                cmd = self._commands.get(block=block and not out)
            except queue.Empty:
                return out
            if isinstance(cmd, _Submit | Abort | Stop):
                out.append(cmd)
                if isinstance(cmd, Stop):
                    return out

    @staticmethod
    def _wire(cmd: Any) -> Any:
        if isinstance(cmd, _Submit):  # rank 0 samples, so followers need no grammar
            return _Submit(replace(cmd.request, constraint=None), None)
        return cmd

    def _apply(self, local: Any, sent: Any) -> bool:
        if isinstance(sent, Stop):
            return False
        if isinstance(sent, Abort):
            self._abort(sent.request_id)
        elif isinstance(sent, _Submit):
            sink = local.sink if self.world.leader else _NullSink()
            self._pending.pop(sent.request.id, None)
            try:
                Engine._add(self, local.request if self.world.leader else sent.request, sink)
            except MlxrunError as e:  # e.g. overloaded: every rank refuses it alike
                deliver([(sink, e)])
        return True

    # -- failure -----------------------------------------------------------------------------

    def _collective(self, fn: Any) -> Any:
        self._busy_since = time.monotonic()
        try:
            return fn()
        except RuntimeError as e:  # MLX's backends raise when a peer's connection breaks
            raise RankFailedError(
                f"{self._peer_name()} stopped answering ({e})",
                rank=1 if self.world.size == 2 else None,
            ) from None
        finally:
            self._busy_since = None

    def _peer_name(self) -> str:
        n = self.world.size
        return "rank 1" if n == 2 else f"one of ranks 1-{n - 1}"

    def _watch(self) -> None:
        """Rank 0: fail everything when one step's collectives take longer than the timeout
        (a peer that hangs, or a network that drops packets without closing the socket)."""
        while not self._failed.wait(_WATCH_INTERVAL_S):
            since = self._busy_since
            limit = STOPPING_TIMEOUT_S if self._stopping else self.step_timeout_s
            if since is not None and time.monotonic() - since > limit:
                why = "the run is being stopped" if self._stopping else "step timeout"
                self._fail(RankFailedError(
                    f"{self._peer_name()} did not answer within {limit:.0f}s ({why})",
                    rank=1 if self.world.size == 2 else None,
                ))  # fmt: skip
                return

    def _fail(self, exc: BaseException) -> None:
        if self._failed.is_set():
            return
        self._error = exc
        self._failed.set()
        sinks = [seq.sink for seq in list(self._seqs.values()) if not seq.done]
        sinks += list(self._pending.values())
        self._pending.clear()
        deliver([(s, exc) for s in sinks])


def _plan_digest(plan: Any, batch_ids: Any) -> list[int]:
    """A few ints that differ when two ranks would run different steps."""
    text = repr((sorted(plan.admitted), list(plan.prefill), list(batch_ids)))
    return [int.from_bytes(hashlib.blake2b(text.encode(), digest_size=6).digest(), "little")]


def run_follower(engine: MirroredEngine) -> None:
    """Ranks > 0: run the mirrored loop until rank 0 stops (or the group breaks)."""
    engine.start()
    assert engine._thread is not None
    engine._thread.join()
    if engine._error is not None:
        raise engine._error


def make_engine(model: Any, config: EngineConfig, *, step_timeout_s: float = STEP_TIMEOUT_S):
    """The engine for this process: mirrored across ranks under mlx.launch, else the plain one."""
    world = distributed.current()
    if world is None:
        return Engine(model, config)
    return MirroredEngine(model, config, world, step_timeout_s=step_timeout_s)
