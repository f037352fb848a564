"""The engine: one thread owns MLX and runs every request in one continuously batched loop.

    engine = Engine(model, EngineConfig(eos_token_ids=info.eos_token_ids, namespace=info.name))
    engine.start()
    async for event in engine.submit(Request("r1", ids, SamplingParams(max_tokens=64))):
        ...                                  # event.new_token_ids, event.finish_reason
    engine.shutdown()

It speaks token ids (DESIGN.md rule 2). Stop token ids and EOS are handled here; stop *strings*
are the output stage's job: the caller feeds tokens to mlxrun.output.TextOutput and calls
`abort(id)` when a stop string completes (the request then ends within one step).

One step: drain submit/abort commands -> Scheduler.schedule() -> admitted requests get their KV
from the prefix cache (memory tier, else disk tier; >= 1 prompt token is always computed; with
cache_reuse, runs cached past the prefix too, spliced in when the prefill reaches them) ->
prompt chunks run into each request's own cache; prompts whose last chunk this is run it
together (one right-padded pass) and join the decode batch feeding their last token -> one
batched decode step (B, 1) with per-row penalties and samplers -> the tokens sampled in the
*previous* step are read and emitted (the next pass is queued before Python waits, as in
mlx-lm) -> finished rows leave the batch, their KV goes to the prefix cache ->
Scheduler.complete_step(). A row that stops is thus computed once more than needed, and the KV
kept for it includes its stop token.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from mlxrun import memory, models
from mlxrun.batch import (
    DecodeBatch,
    RequestState,
    RequestStream,
    RowSampler,
    SyncStream,
    batch_merge,
    deliver,
)
from mlxrun.budget import output_budget
from mlxrun.cache import (
    block_from_cache,
    block_nbytes,
    cache_from_blocks,
    concat_blocks,
    split_block,
    supports_prefix_cache,
)
from mlxrun.disk_tier import CHUNK_TOKENS, DiskTier, Prefetch, model_fingerprint
from mlxrun.engine_commands import Abort, Command, Stop, Wake
from mlxrun.errors import InvalidRequestError
from mlxrun.kv_files import kv_layout
from mlxrun.kv_precision import KVPrecision
from mlxrun.kv_quant import quant_of
from mlxrun.kv_reuse import ChunkReuse
from mlxrun.prefix_cache import RadixCache
from mlxrun.sampling import SamplingParams
from mlxrun.scheduler import Scheduler, SchedulerConfig, SeqState

RATE_WINDOW_S = 10.0  # tokens/s in stats() covers this recent window


@dataclass(frozen=True)
class Request:
    id: str
    prompt_token_ids: Sequence[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    priority: int = 0  # higher first (interactive requests, e.g. autocomplete: 1)
    group: str | None = None  # a new request aborts older unfinished ones of its group
    namespace: str | None = None  # prefix-cache key beside the model's (e.g. an adapter)
    constraint: Any = None  # a mlxrun.constrain.Constraint: sampling follows its grammar
    pin_prefix: int = 0  # keep this many prompt tokens' KV in the prefix cache (cache_control)


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (id, logprob), most likely first


@dataclass(frozen=True)
class Event:
    """New tokens of one request. A stop token (EOS or stop_token_ids) ends the request with
    finish_reason "stop" and is not among new_token_ids."""

    id: str
    new_token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None  # one per new token, when params.logprobs
    finish_reason: str | None = None  # None | "stop" | "length" | "abort"
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (chunks too)
    prompt_tokens: int = 0
    step: int = 0  # the engine step that produced it (for tests and tracing)
    reused_chunk_tokens: int = 0  # of cached_tokens, those reused past the prefix (cache_reuse)


@dataclass(frozen=True)
class EngineConfig:
    max_running: int = 16  # rows in the decode batch
    max_tokens_per_step: int = 512  # per step: 1 per decode, prefill chunks get the rest
    max_waiting: int = 256  # past it submit() raises EngineOverloadedError
    cache_memory_bytes: int = 1 << 30  # prefix cache (memory tier); 0 = off
    kv_memory_bytes: int | None = None  # KV budget of running requests; None = what memory allows
    kv_capacity_tokens: int | None = None  # overrides kv_memory_bytes
    cache_dir: str | None = None  # disk tier; None = off
    disk_cache_bytes: int = 8 << 30
    disk_chunk_tokens: int = CHUNK_TOKENS  # tokens per disk segment (mlxrun.disk_tier)
    eos_token_ids: tuple[int, ...] = ()
    namespace: str = ""  # the model's id: prefixes never match across models
    context_length: int | None = None
    # No max_tokens: this many (None: what the context leaves; mlxrun.budget's fallback if none).
    default_max_tokens: int | None = None
    max_pinned_prefixes: int = 8  # pinned prefixes beyond it release the oldest
    pin_ttl_s: float = 300.0  # a pin lasts this long after its last use (Anthropic's 5 minutes)
    cache_reuse: int = 0  # reuse cached runs this long past the prefix (0 = off; kv_reuse)
    # KV precision (mlxrun.kv_precision): None = full; 8 / 4 = quantized in the batch and the
    # prefix cache; "auto" = full while the KV budget allows, then the batch moves to 8-bit.
    kv_bits: int | str | None = None
    kv_group_size: int = 64


class Engine:
    def __init__(self, model: Any, config: EngineConfig | None = None):
        self.model = model
        self.config = config or EngineConfig()
        self._lock = threading.Lock()  # guards the scheduler and _seqs (submit runs on callers)
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._seqs: dict[str, RequestState] = {}
        self._batch = DecodeBatch()
        self._scheduler: Scheduler | None = None
        self._radix: RadixCache | None = None
        self._reuse: ChunkReuse | None = None
        self._disk: DiskTier | None = None
        self._disk_reads: dict[str, tuple[Prefetch, list, list[int]]] = {}  # admitted, reading
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._vocab_size = 0
        self._step_no = 0
        self._rates: deque = deque()  # (time, prompt tokens, generated tokens) per step
        self._counts = dict.fromkeys(
            ("prompt_tokens", "generation_tokens", "cache_hits", "cache_hit_tokens",
             "disk_hits", "disk_hit_tokens", "aborted", "group_cancellations", "finished",
             "pinned_prefixes"), 0)  # fmt: skip
        self._cache_stats: dict = {}
        self._outbox: list = []  # (stream, event) pairs, delivered once per step
        self._pins: dict[tuple, tuple[Any, float]] = {}  # (ns, prefix) -> (locked node, expiry)
        self._kv = KVPrecision(self.config.kv_bits, self.config.kv_group_size)  # checks them

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> Engine:
        if self._thread is not None:
            return self
        # Lazily loaded weights belong to the loading thread's stream: read them in here.
        mx.eval(self.model.parameters())
        self._thread = threading.Thread(target=self._run, name="mlxrun-engine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self

    def shutdown(self) -> None:
        """Abort everything, write the prefix cache to the disk tier (when on), join the thread."""
        if self._thread is None:
            return
        self._commands.put(Stop())
        self._thread.join()

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def _run(self) -> None:
        try:
            with mx.stream(mx.new_stream(mx.default_device())):
                self._setup()
                self._ready.set()
                info = memory.device_memory()
                with memory.wired_limit(info.recommended_bytes or info.budget_bytes):
                    self._loop()
        except Exception as e:  # fail every open request rather than hang it
            self._error = e
            self._ready.set()
            deliver(self._outbox + [(seq.sink, e) for seq in list(self._seqs.values())])

    def _setup(self) -> None:
        """Probe the model once: vocabulary, cache kind, KV bytes per token; size the tiers."""
        cfg = self.config
        cache = models.make_cache(self.model)
        logits = self.model(mx.array([[0]]), cache=cache)
        mx.eval(logits, [c.state for c in cache])
        self._vocab_size = int(logits.shape[-1])
        self._prefix_ok = supports_prefix_cache(cache)
        merge = batch_merge(self.model, lambda: models.make_cache(self.model))
        self._batch = DecodeBatch(self._kv.setup(self.model, cache, merge))
        max_running = cfg.max_running if self._batch.merge is not None else 1
        per_token, capacity = self._kv.smallest_per_token, cfg.kv_capacity_tokens
        if capacity is None and per_token:
            budget = cfg.kv_memory_bytes
            if budget is None:  # what is left beside the weights and the prefix cache
                budget = memory.device_memory().budget_bytes - mx.get_active_memory()
                budget -= cfg.cache_memory_bytes
            capacity = max(budget // per_token, cfg.context_length or 1)
        self._kv.set_capacity(capacity)
        self._scheduler = Scheduler(
            SchedulerConfig(
                max_running, max(cfg.max_tokens_per_step, max_running), cfg.max_waiting, capacity
            )
        )
        if cfg.cache_dir is not None and self._prefix_ok:
            layout = kv_layout(cache)
            self._disk = DiskTier(
                cfg.cache_dir, model_id=cfg.namespace, layout=layout,
                fingerprint=model_fingerprint(self.model, layout),
                budget_bytes=cfg.disk_cache_bytes, chunk_tokens=cfg.disk_chunk_tokens,
            )  # fmt: skip
        if self._prefix_ok and (cfg.cache_memory_bytes > 0 or self._disk is not None):
            on_evict = self._disk.offer if self._disk is not None else None
            self._radix = RadixCache(
                cfg.cache_memory_bytes, nbytes=block_nbytes, split=split_block, on_evict=on_evict
            )
        if cfg.cache_reuse > 0:
            self._reuse = ChunkReuse.for_model(self.model, cfg.cache_reuse, self._radix)
        self._publish_cache_stats()

    # -- submitting and stats (any thread) ----------------------------------------------------

    def submit(self, request: Request) -> RequestStream:
        """Queue a request (call from a running event loop); iterate the result for its events.
        Raises EngineOverloadedError when the queue is full, InvalidRequestError for bad input."""
        stream = RequestStream(request.id, self.abort, asyncio.get_running_loop())
        self._add(request, stream)
        return stream

    def submit_sync(self, request: Request) -> SyncStream:
        """Queue a request; the result is a blocking iterator of its events (CLI, tests)."""
        stream = SyncStream(request.id, self.abort)
        self._add(request, stream)
        return stream

    def generate_sync(self, request: Request) -> list[Event]:
        return list(self.submit_sync(request))

    @property
    def is_alive(self) -> bool:
        """Whether the engine thread runs (False before start, after shutdown, or if it died)."""
        return self._thread is not None and self._thread.is_alive()

    def abort(self, request_id: str) -> None:
        """Stop a request (thread-safe): it ends within one step with finish_reason "abort"."""
        self._commands.put(Abort(request_id))

    def _add(self, request: Request, sink: Any) -> None:
        if self._thread is None or not self._thread.is_alive():
            raise RuntimeError("the engine is not running (call start())") from self._error
        seq = self._make_seq(request, sink)
        state = SeqState(
            request.id, len(seq.prompt), seq.budget, priority=request.priority, group=request.group
        )
        with self._lock:
            assert self._scheduler is not None
            older = self._scheduler.add(state)  # raises before anything is registered
            self._seqs[request.id] = seq
            self._counts["group_cancellations"] += len(older)
        for rid in older:
            self.abort(rid)
        self._commands.put(Wake())

    def _make_seq(self, request: Request, sink: Any) -> RequestState:
        ids, params, cfg = request.prompt_token_ids, request.params, self.config
        if not ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        if min(ids) < 0 or max(ids) >= self._vocab_size:
            raise InvalidRequestError(
                f"prompt token ids must be in [0, {self._vocab_size})", param="prompt"
            )
        params.check_vocab(self._vocab_size)
        # Strict: the engine's callers (the server) have applied the clamp rule already.
        budget = output_budget(
            len(ids), params.max_tokens, cfg.context_length,
            default=cfg.default_max_tokens, strict=True,
        ).granted  # fmt: skip
        stop = set(params.stop_token_ids) | (set() if params.ignore_eos else set(cfg.eos_token_ids))
        return RequestState(
            request, sink, frozenset(stop), budget, (cfg.namespace, request.namespace)
        )

    def stats(self) -> dict:
        with self._lock:
            sched = self._scheduler.stats() if self._scheduler is not None else {}
        now = time.monotonic()
        recent = [r for r in list(self._rates) if now - r[0] <= RATE_WINDOW_S]
        span = max(now - recent[0][0], 1e-9) if recent else 1.0
        prompt_rate, gen_rate = (sum(r[i] for r in recent) / span for i in (1, 2))
        return {
            "running": sched.get("running", 0),
            "waiting": sched.get("waiting", 0),
            "kv_tokens_reserved": sched.get("kv_tokens_reserved", 0),
            "kv_capacity_tokens": sched.get("kv_capacity_tokens"),
            **self._counts,
            **(self._reuse.counts if self._reuse is not None else {}),
            "prompt_tokens_per_s": prompt_rate,
            "generation_tokens_per_s": gen_rate,
            "steps": self._step_no,
            **self._cache_stats,
            **self._kv.stats,
        }

    def _publish_cache_stats(self) -> None:  # a snapshot: stats() runs on other threads
        tiers = (("memory", self._radix), ("disk", self._disk))
        self._cache_stats = {
            f"cache_{name}_{k}": v
            for name, t in tiers
            if t is not None
            for k, v in t.stats().items()
        }

    # -- the loop (engine thread) -----------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._lock:
                busy = self._scheduler is not None and self._scheduler.has_work
            if not busy:
                mx.clear_cache()  # idle: hand the allocator's spare buffers back
            if not self._drain(block=not busy):
                self._stop()
                deliver(self._outbox)
                return
            self._step()
            deliver(self._outbox)
            self._outbox = []

    def _drain(self, block: bool) -> bool:
        """Apply queued commands; False on shutdown."""
        while True:
            try:
                cmd = self._commands.get(block=block)
            except queue.Empty:
                return True
            block = False
            if isinstance(cmd, Stop):
                return False
            if isinstance(cmd, Abort):
                self._abort(cmd.request_id)

    def _stop(self) -> None:
        for rid in list(self._seqs):
            self._abort(rid)
        if self._radix is not None and self._disk is not None:
            self._release_pins(float("inf"))
            self._disk.wait_when_full = True  # no decode step left to stall: write it all
            self._radix.evict(self._radix.total_bytes)  # every path goes to disk
        if self._disk is not None:
            self._disk.close()  # the queued writes land before shutdown() returns
        self._publish_cache_stats()

    def _step(self) -> None:
        if self._pins:
            self._release_pins(time.monotonic())
        plan = self._plan()
        if self._disk_reads:
            self._wait_for_disk(plan)
        computed: dict[str, int] = {}
        joiners = self._prefill(plan.prefill, computed)
        batch, finished = self._batch, []
        if batch.ids:
            seqs = [self._seqs[i] for i in batch.ids]
            ids, tokens, extras, generated = batch.step(self.model, [s.row for s in seqs])
            for seq in seqs:
                seq.kv += 1
            computed.update(dict.fromkeys(ids, 1))
            finished = self._read(ids, tokens.tolist(), extras, generated)
        self._retire(finished)
        self._join(joiners)
        with self._lock:
            assert self._scheduler is not None
            self._scheduler.complete_step(computed, [s.id for s in finished])
        now = time.monotonic()
        self._rates.append((now, sum(n for _, n in plan.prefill), len(batch.ids)))
        while self._rates and now - self._rates[0][0] > RATE_WINDOW_S:
            self._rates.popleft()
        self._step_no += 1
        self._kv.publish(len(self._batch), self._prefilling())
        if self._step_no % 256 == 0:  # the allocator's free buffers pile up over a long run
            mx.clear_cache()

    def _plan(self) -> Any:
        """schedule(); admitted requests get their KV (prefix hits move their starting point, so
        the plan is made again when there were any)."""
        assert self._scheduler is not None
        if self._disk_reads:
            self._land_disk_reads()
        while True:
            with self._lock:
                plan = self._scheduler.schedule()
                reserved = self._scheduler.stats()["kv_tokens_reserved"]
            self._kv.adapt(reserved, self._batch, self._prefilling())
            hits = [self._admit(rid) for rid in plan.admitted]
            if not any(hits):
                return plan

    def _admit(self, rid: str) -> int:
        seq = self._seqs[rid]
        seq.row = RowSampler(seq.params, seq.constraint)
        seq.cache = self._kv.make_cache(self.model)
        blocks, hit = self._lookup(rid, seq.namespace, seq.prompt[:-1])  # >= 1 token to compute
        self._use_prefix(seq, blocks, hit)
        return hit

    def _use_prefix(self, seq: RequestState, blocks: list, hit: int) -> None:
        if hit:
            cache_from_blocks(blocks, seq.cache)
            self._counts["cache_hits"] += 1
            self._counts["cache_hit_tokens"] += hit
            with self._lock:
                assert self._scheduler is not None
                self._scheduler.mark_cached(seq.id, hit)
        seq.computed = seq.cached = seq.kv = hit
        if self._reuse is not None:  # runs cached past the prefix, spliced as prefill reaches them
            seq.reuse = self._reuse.plan_for(seq, hit)

    def _lookup(self, rid: str, namespace: tuple, tokens: list[int]) -> tuple[list, int]:
        if self._radix is None or not tokens:
            return [], 0
        match = self._radix.match_prefix(namespace, tokens)
        if self._disk is not None:
            quant = quant_of(self._seqs[rid].cache[0])  # the precision this request computes at
            read = self._disk.fetch(namespace, tokens, have=match.length, quant=quant)
            if read is not None:  # the request computes nothing until the read lands
                self._disk_reads[rid] = (read, match.values, tokens)
                return [], 0
        self._publish_cache_stats()
        return match.values, match.length

    def _land_disk_reads(self) -> None:
        """Requests whose disk read finished get their prefix: the memory tier's blocks up to
        where the read starts, then the read's (numpy -> MLX copies, on this thread)."""
        assert self._radix is not None
        for rid, (read, values, tokens) in list(self._disk_reads.items()):
            if not read.done():
                continue
            del self._disk_reads[rid]
            seq = self._seqs.get(rid)
            if seq is None or seq.done:
                continue
            block, end = read.block()
            quant = quant_of(seq.cache[0])  # a file or block may be at another precision
            values = [b.to_precision(quant) for b in values]
            blocks, hit = values, sum(b.length for b in values)
            if block is not None and end > hit:
                block = block.to_precision(quant)
                head = concat_blocks(values).slice(0, read.start) if read.start else None
                blocks, hit = [b for b in (head, block) if b is not None], end
                self._radix.insert(seq.namespace, tokens[:end], concat_blocks(blocks))
                self._counts["disk_hits"] += 1
                self._counts["disk_hit_tokens"] += end - read.start
            self._use_prefix(seq, blocks, hit)
        self._publish_cache_stats()

    def _wait_for_disk(self, plan: Any) -> None:
        """Nothing but disk reads to wait for: wait a little for one (not a busy loop)."""
        if self._batch.ids or any(rid not in self._disk_reads for rid, _ in plan.prefill):
            return
        futures = [read.future for read, _, _ in self._disk_reads.values()]
        concurrent.futures.wait(futures, timeout=0.01, return_when="FIRST_COMPLETED")

    def _prefilling(self) -> list[RequestState]:
        """Admitted requests whose KV is still in their own cache."""
        with self._lock:
            return [s for s in self._seqs.values() if s.cache is not None]

    def _prefill(
        self, chunks: list[tuple[str, int]], computed: dict[str, int]
    ) -> list[tuple[RequestState, list[int]]]:
        """Run prompt chunks into the requests' own caches. A prompt's final chunk is left to
        `_join` (batched across requests). Returns [(request, final chunk)]."""
        joiners = []
        for rid, n in chunks:
            if rid in self._disk_reads:
                continue  # its prefix is still being read from disk
            seq = self._seqs[rid]
            spliced = seq.reuse.splice(seq) if seq.reuse is not None else 0
            stop = seq.computed + n if seq.reuse is None else seq.reuse.clip(seq.computed + n)
            chunk = seq.prompt[seq.computed : stop]
            seq.computed += len(chunk)
            computed[rid] = spliced + len(chunk)
            self._counts["prompt_tokens"] += len(chunk)
            if seq.computed == len(seq.prompt):
                joiners.append((seq, chunk))
                continue
            self.model(mx.array(chunk)[None], cache=seq.cache)  # logits are never evaluated
            mx.async_eval([c.state for c in seq.cache])
            seq.kv += len(chunk)
            computed[rid] += seq.reuse.splice(seq) if seq.reuse is not None else 0
        return joiners

    def _join(self, joiners: list[tuple[RequestState, list[int]]]) -> None:
        """Final chunks, but the last token, run as one pass and the requests join the batch.
        The last token is fed by the next decode step, which samples the first token (as
        mlx-lm does): no full-chunk logits, no forward pass of one row."""
        if not joiners:
            return
        seqs = [s for s, _ in joiners]
        rests, last = [c[:-1] for _, c in joiners], [c[-1] for _, c in joiners]
        self._batch.join(self.model, [s.id for s in seqs], [s.cache for s in seqs], rests, last)
        for seq, rest in zip(seqs, rests, strict=True):
            seq.cache = None
            seq.kv += len(rest)

    def _read(
        self, ids: list[str], tokens: list[int], extras: list, generated: list
    ) -> list[RequestState]:
        """Emit the tokens sampled last step (rows that fed a prompt token have none yet).
        Returns the requests that finished."""
        finished = []
        for rid, token, extra, fresh in zip(ids, tokens, extras, generated, strict=True):
            if not fresh:
                continue
            seq = self._seqs[rid]
            seq.generated.append(token)
            self._counts["generation_tokens"] += 1
            if token in seq.stop_ids:
                finished.append(seq)
                self._emit(seq, [], None, "stop")
                continue
            lps = None
            if extra is not None:
                lp, top_ids, top_lps = (x.tolist() for x in extra)
                # Tokens a grammar forbids have no probability: no alternatives (nor valid JSON).
                top = tuple(
                    (i, v) for i, v in zip(top_ids[0], top_lps[0], strict=True) if v > -math.inf
                )
                lps = [TokenLogprob(token, lp[0], top)]
            done = len(seq.generated) >= seq.budget
            if done:
                finished.append(seq)
            self._emit(seq, [token], lps, "length" if done else None)
        return finished

    def _retire(self, finished: list[RequestState]) -> None:
        """Finished rows leave the batch; their KV goes to the prefix cache."""
        if not finished:
            return
        gone = {s.id for s in finished}
        for seq in finished:
            self._cache_kv(seq, self._batch.caches, self._batch.index(seq.id))
        self._batch.keep([i for i, rid in enumerate(self._batch.ids) if rid not in gone])
        self._publish_cache_stats()

    def _cache_kv(self, seq: RequestState, cache: list | None, row: int) -> None:
        """Offer a leaving request's KV (prompt + generated tokens) to the prefix cache."""
        if self._radix is None or cache is None:
            return
        tokens = (seq.prompt + seq.generated)[: seq.kv]
        block = block_from_cache(cache, len(tokens), row)
        if block is None:
            return
        if self._radix.insert(seq.namespace, tokens, block) == len(tokens):
            block.materialize()  # stored whole: copy it out of the batch buffer
        if seq.pin:
            self._pin(seq.namespace, seq.prompt[: seq.pin])

    def _pin(self, namespace: tuple, prefix: list[int]) -> None:
        """Lock a stored prefix against eviction for pin_ttl_s (renewed by each use)."""
        assert self._radix is not None
        key, now = (namespace, tuple(prefix)), time.monotonic()
        expiry = now + self.config.pin_ttl_s
        held = self._pins.pop(key, None)
        if held is None:
            match = self._radix.match_prefix(namespace, prefix)
            if match.length != len(prefix) or match.node is None:
                return  # not stored whole (the cache is too small for it)
            self._radix.lock(match.node)
            held = (match.node, expiry)
        self._pins[key] = (held[0], expiry)  # re-inserted: the dict's order is last use
        self._release_pins(now)

    def _release_pins(self, now: float) -> None:
        assert self._radix is not None
        over = len(self._pins) - self.config.max_pinned_prefixes
        for key, (node, expiry) in list(self._pins.items()):
            if over > 0 or expiry <= now:
                del self._pins[key]
                self._radix.unlock(node)
                over -= 1
        self._counts["pinned_prefixes"] = len(self._pins)

    def _abort(self, rid: str) -> None:
        with self._lock:
            assert self._scheduler is not None
            state = self._scheduler.abort(rid)
        seq = self._seqs.get(rid)
        self._disk_reads.pop(rid, None)
        if seq is None or seq.done:
            return
        if rid in self._batch.ids:
            idx = self._batch.index(rid)
            self._cache_kv(seq, self._batch.caches, idx)
            self._batch.keep([i for i in range(len(self._batch)) if i != idx])
        elif seq.cache is not None:
            self._cache_kv(seq, seq.cache, 0)
        seq.cache = None
        if state is not None:
            self._counts["aborted"] += 1
        self._publish_cache_stats()
        self._emit(seq, [], None, "abort")

    def _emit(self, seq: RequestState, tokens: list[int], lps: Any, finish: str | None) -> None:
        reused = seq.reuse.reused if seq.reuse is not None else 0
        event = Event(
            seq.id, tokens, lps, finish, seq.cached, len(seq.prompt), self._step_no, reused
        )
        if finish is not None:
            seq.done = True
            self._counts["finished"] += 1
            with self._lock:
                self._seqs.pop(seq.id, None)
        self._outbox.append((seq.sink, event))
