"""Scheduler: pure bookkeeping for continuous batching. No MLX here, so it is testable with no model.

Design (after vLLM v1). There are no prefill and decode phases: each request carries
`num_computed_tokens` (tokens whose KV exists) and `num_tokens` (prompt + generated). Every step the
engine calls `schedule()`, runs one forward pass over the plan, then reports back with `complete_step()`.

A step, in order:

1. **Admission.** Waiting requests move to the running set in (priority desc, arrival) order while the
   running set has a free slot (`max_running`) and their KV reservation (prompt + max_tokens) fits under
   `kv_capacity_tokens`. Admission is strict head-of-line: if the head does not fit, nothing behind it
   jumps ahead, so a large request is never starved by a stream of small ones of the same priority.
2. **Decodes.** Every running request whose prompt is fully computed decodes one token. Decodes come first
   and always fit: the config requires `max_tokens_per_step >= max_running`, so they are never starved.
3. **Prefill chunks.** What is left of the token budget goes to running requests still prefilling, in
   (priority desc, arrival) order, each taking at most what it still needs. A long prompt is therefore
   loaded over several steps while decoders keep producing a token every step.

Bookkeeping in `complete_step`: a request's `num_computed_tokens` grows by what was computed; once it
reaches `num_tokens` (the prompt's last chunk, or a decode) the engine has sampled one new token, so
`num_tokens` grows by one. A request whose prefill finishes in a step is thus a decoder from the next step.

Overload: the waiting queue is bounded. `add` raises `EngineOverloadedError` when the queue already holds
`max_waiting` requests beyond those the free running slots will take at the next step (requests of the
same group that the new one cancels are counted as gone). Nothing is ever dropped silently: a request
leaves only through `complete_step(finished=...)` or `abort`.

Group cancellation: `add` returns the ids of older unfinished requests of the same group (e.g. the
autocomplete request fired on the previous keystroke); the engine aborts them (it must also free their KV,
so the scheduler does not remove them itself).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from mlxrun.errors import EngineOverloadedError, InvalidRequestError


@dataclass(frozen=True)
class SchedulerConfig:
    max_running: int = 16  # sequences in the running batch
    max_tokens_per_step: int = 512  # each decode costs 1; prefill chunks take the rest
    max_waiting: int = 256  # bounded queue; past it add() raises EngineOverloadedError
    kv_capacity_tokens: int | None = None  # KV tokens the engine may hold (None = unlimited)
    retry_after_s: float = 1.0  # hint given with EngineOverloadedError

    def __post_init__(self) -> None:
        if self.max_running < 1:
            raise InvalidRequestError(
                f"max_running must be at least 1, got {self.max_running}", param="max_running"
            )
        if self.max_tokens_per_step < self.max_running:
            # Every running decoder must fit in every step, or decodes could starve.
            raise InvalidRequestError(
                f"max_tokens_per_step ({self.max_tokens_per_step}) must be at least "
                f"max_running ({self.max_running})",
                param="max_tokens_per_step",
            )
        if self.max_waiting < 0:
            raise InvalidRequestError(
                f"max_waiting must be >= 0, got {self.max_waiting}", param="max_waiting"
            )
        if self.kv_capacity_tokens is not None and self.kv_capacity_tokens < 1:
            raise InvalidRequestError(
                f"kv_capacity_tokens must be positive, got {self.kv_capacity_tokens}",
                param="kv_capacity_tokens",
            )


@dataclass
class SeqState:
    request_id: str
    num_prompt_tokens: int
    max_tokens: int
    num_computed_tokens: int = 0  # tokens whose KV exists (starts at the prefix-cache hit length)
    num_tokens: int = 0  # prompt + generated so far (set to num_prompt_tokens on add if 0)
    priority: int = 0  # higher runs first (interactive requests, e.g. autocomplete, use 1)
    group: str | None = None  # group cancellation key
    status: str = "waiting"  # "waiting" | "running" | "finished"

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed_tokens < self.num_prompt_tokens

    @property
    def kv_tokens_reserved(self) -> int:
        return self.num_prompt_tokens + self.max_tokens

    @property
    def num_generated(self) -> int:
        return self.num_tokens - self.num_prompt_tokens


@dataclass(frozen=True)
class StepPlan:
    decode: list[str]  # running requests that decode one token this step
    prefill: list[tuple[str, int]]  # (request_id, prompt tokens to compute this step)
    admitted: list[str]  # moved waiting -> running this step (the engine sets up their KV)

    @property
    def num_tokens(self) -> int:
        return len(self.decode) + sum(n for _, n in self.prefill)

    @property
    def is_empty(self) -> bool:
        return not self.decode and not self.prefill and not self.admitted


class Scheduler:
    def __init__(self, config: SchedulerConfig | None = None):
        self.config = config or SchedulerConfig()
        self._waiting: list[SeqState] = []  # kept sorted by _order
        self._running: dict[str, SeqState] = {}
        self._arrival: dict[str, int] = {}
        self._next_arrival = 0
        self._kv_reserved = 0
        self._counts = {"added": 0, "finished": 0, "aborted": 0, "rejected": 0}

    # -- queries ---------------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def has_work(self) -> bool:
        return bool(self._running or self._waiting)

    def get(self, request_id: str) -> SeqState | None:
        seq = self._running.get(request_id)
        if seq is not None:
            return seq
        return next((s for s in self._waiting if s.request_id == request_id), None)

    def stats(self) -> dict:
        return {
            "running": len(self._running),
            "waiting": len(self._waiting),
            "prefilling": sum(1 for s in self._running.values() if s.is_prefilling),
            "kv_tokens_reserved": self._kv_reserved,
            "kv_capacity_tokens": self.config.kv_capacity_tokens,
            **self._counts,
        }

    def _order(self, seq: SeqState) -> tuple[int, int]:
        return (-seq.priority, self._arrival[seq.request_id])

    # -- requests in and out ---------------------------------------------------------------------

    def add(self, seq: SeqState) -> list[str]:
        """Queue a request. Returns ids of older unfinished requests in its group (to abort)."""
        self._validate(seq)
        cancelled = self._same_group(seq.group)
        # Waiting requests this one cancels will leave the queue: don't count them against it.
        cancelled_waiting = sum(1 for s in self._waiting if s.request_id in cancelled)
        waiting_after = len(self._waiting) - cancelled_waiting
        free_slots = max(0, self.config.max_running - len(self._running))
        if waiting_after >= self.config.max_waiting + free_slots:
            self._counts["rejected"] += 1
            raise EngineOverloadedError(
                f"the engine is busy: {len(self._waiting)} requests are already waiting "
                f"(limit {self.config.max_waiting})",
                retry_after=self.config.retry_after_s,
            )
        if seq.num_tokens == 0:
            seq.num_tokens = seq.num_prompt_tokens
        seq.status = "waiting"
        self._arrival[seq.request_id] = self._next_arrival
        self._next_arrival += 1
        bisect.insort(self._waiting, seq, key=self._order)
        self._counts["added"] += 1
        return cancelled

    def _validate(self, seq: SeqState) -> None:
        if seq.request_id in self._arrival:
            raise InvalidRequestError(
                f"request id {seq.request_id!r} is already in use", param="request_id"
            )
        if seq.num_prompt_tokens < 1:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        if seq.max_tokens < 1:
            raise InvalidRequestError(
                f"max_tokens must be at least 1, got {seq.max_tokens}", param="max_tokens"
            )
        # Engine contract, not user input: at least one prompt token must be computed to get logits.
        if not 0 <= seq.num_computed_tokens < seq.num_prompt_tokens:
            raise ValueError(
                f"num_computed_tokens must be in [0, {seq.num_prompt_tokens}), "
                f"got {seq.num_computed_tokens}"
            )
        if seq.num_tokens not in (0, seq.num_prompt_tokens):
            raise ValueError("a new request must have num_tokens == num_prompt_tokens (or 0)")
        cap = self.config.kv_capacity_tokens
        if cap is not None and seq.kv_tokens_reserved > cap:
            self._counts["rejected"] += 1
            too_long = seq.num_prompt_tokens >= cap
            raise InvalidRequestError(
                f"the request needs {seq.kv_tokens_reserved} KV tokens "
                f"({seq.num_prompt_tokens} prompt + {seq.max_tokens} max_tokens) "
                f"but the engine holds at most {cap}",
                param="prompt" if too_long else "max_tokens",
                hint="Shorten the prompt." if too_long else "Lower max_tokens.",
            )

    def _same_group(self, group: str | None) -> list[str]:
        if group is None:
            return []
        older = [s for s in self._running.values() if s.group == group]
        older += [s for s in self._waiting if s.group == group]
        older.sort(key=lambda s: self._arrival[s.request_id])
        return [s.request_id for s in older]

    def abort(self, request_id: str) -> SeqState | None:
        """Remove a request wherever it is. Returns its state, or None if it is unknown or gone."""
        seq = self._remove(request_id)
        if seq is not None:
            self._counts["aborted"] += 1
        return seq

    def _remove(self, request_id: str) -> SeqState | None:
        seq = self._running.pop(request_id, None)
        if seq is not None:
            self._kv_reserved -= seq.kv_tokens_reserved
        else:
            idx = next((i for i, s in enumerate(self._waiting) if s.request_id == request_id), None)
            if idx is None:
                return None
            seq = self._waiting.pop(idx)
        del self._arrival[request_id]
        seq.status = "finished"
        return seq

    # -- one step --------------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        admitted = self._admit()
        decode = [rid for rid, s in self._running.items() if not s.is_prefilling]
        budget = self.config.max_tokens_per_step - len(decode)
        prefill: list[tuple[str, int]] = []
        prefilling = [s for s in self._running.values() if s.is_prefilling]
        for seq in sorted(prefilling, key=self._order):
            if budget <= 0:
                break
            n = min(budget, seq.num_prompt_tokens - seq.num_computed_tokens)
            prefill.append((seq.request_id, n))
            budget -= n
        return StepPlan(decode=decode, prefill=prefill, admitted=admitted)

    def _admit(self) -> list[str]:
        cap = self.config.kv_capacity_tokens
        admitted: list[str] = []
        while self._waiting and len(self._running) < self.config.max_running:
            head = self._waiting[0]
            if cap is not None and self._kv_reserved + head.kv_tokens_reserved > cap:
                break  # head-of-line: wait for KV rather than let smaller requests jump ahead
            self._waiting.pop(0)
            head.status = "running"
            self._running[head.request_id] = head
            self._kv_reserved += head.kv_tokens_reserved
            admitted.append(head.request_id)
        return admitted

    def mark_cached(self, request_id: str, tokens: int) -> None:
        """An admitted request starts with `tokens` of its prompt already in KV (a prefix-cache
        hit): they are not scheduled for prefill. At least one prompt token stays to compute,
        since the first sample needs that token's logits."""
        seq = self._running.get(request_id)
        if seq is None:
            raise KeyError(f"request {request_id!r} is not running")
        if not 0 <= tokens < seq.num_prompt_tokens:
            raise ValueError(
                f"request {request_id!r}: {tokens} cached tokens, the prompt has "
                f"{seq.num_prompt_tokens}"
            )
        seq.num_computed_tokens = tokens

    def complete_step(self, computed: dict[str, int], finished: list[str]) -> None:
        """Record what the engine computed this step, then drop the finished requests.

        Ids no longer running (aborted between schedule and complete) are ignored.
        """
        for rid, n in computed.items():
            seq = self._running.get(rid)
            if seq is None:
                continue
            need = seq.num_prompt_tokens - seq.num_computed_tokens if seq.is_prefilling else 1
            if not 0 <= n <= need:
                raise ValueError(f"request {rid!r}: computed {n} tokens, at most {need} allowed")
            seq.num_computed_tokens += n
            if n and seq.num_computed_tokens >= seq.num_tokens:
                seq.num_tokens += 1  # all known tokens have KV: the engine sampled a new one
        for rid in finished:
            if self._remove(rid) is not None:
                self._counts["finished"] += 1
