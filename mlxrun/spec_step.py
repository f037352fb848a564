"""Speculation inside the batched decode step.

Every running row may carry k proposed tokens (its own k: a prediction, prompt lookup, or the
draft model). A speculative step reads the tokens the rows feed next (the previous step's
samples; this step gives up mlx-lm's overlap of sampling and the next forward, which plain
steps keep), asks each row's proposer for up to k tokens, and runs one forward pass over
(B, 1 + K) tokens, K the longest proposal, short rows padded. Each row then keeps its accepted
prefix and one bonus token (mlxrun.spec_accept), and the KV of everything after it is rolled
back (`rollback`). Rows without proposals (constrained rows among them: their grammar is
applied by mlxrun.batch.sample_rows as in a plain step) sample at position 0 and drop the rest.

The bonus token becomes the row's next fed token, exactly as a plain step's sample does, so
the engine emits it (with its stop and budget checks) when the next step reads it.

Rollback is exact: positions are only ever dropped from the end of a row, by trimming the
batch cache by the smallest drop and rolling each row right by the rest of its own drop (mlx-lm
does the same for right-padded prompt batches), which moves the dropped positions out of the
row and masks them as left padding. Valid KV keeps its values and its RoPE offsets.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache

from mlxrun.batch import sample_rows
from mlxrun.kv_quant import BatchQuantizedKVCache
from mlxrun.spec_accept import Verdict, position_logprobs, token_extras, verify_row
from mlxrun.speculate import (
    Acceptance,
    NgramProposer,
    Payoff,
    PredictionProposer,
)

SPECULATE_MODES = ("ngram",)  # --speculate values; a draft model is its own option
PRIORS = {"prediction": 0.8, "ngram": 0.5, "draft": 0.6}  # acceptance assumed before any data


@dataclass(frozen=True)
class SpecConfig:
    mode: str | None = None  # "ngram" for every request; predictions speculate regardless
    max_k: int = 5  # proposals per row per step, at most
    adaptive: bool = True  # False: always max_k (benchmarks, tests)
    prior_threshold: float = 0.1
    threshold: float | None = None  # fixed (tests, benchmarks): no step-time measurement
    draft: Any = field(default=None, compare=False, repr=False)  # a mlxrun.draft.Draft


def can_rollback(caches: Sequence[Any] | None) -> bool:
    """Whether the batch cache can drop a row's last positions (plain attention KV only:
    sliding windows and recurrent states cannot be rewound)."""
    return bool(caches) and all(
        isinstance(c, (BatchKVCache, BatchQuantizedKVCache)) for c in caches or ()
    )


def rollback(caches: Sequence[Any], drops: Sequence[int]) -> None:
    """Drop the last drops[i] positions of row i from every layer's batch cache."""
    common = min(drops)
    rest = [d - common for d in drops]
    for c in caches:
        if common:
            c._idx -= common
            c.offset = c.offset - common
        if max(rest):
            c.prepare(right_padding=rest)
            c.finalize()  # rolls each row right by its own rest: those positions become padding


@dataclass
class RowSpec:
    """One request's speculation state (on RequestState.spec)."""

    proposer: Any
    acceptance: Acceptance
    proposed: int = 0  # tokens proposed over the request's life
    accepted: int = 0  # of them, kept


@dataclass
class _Row:  # one batch row during a speculative step
    index: int
    proposal: list[int]
    verdict: Verdict | None = None
    logprobs: Any = None


@dataclass
class Speculator:
    config: SpecConfig
    counts: dict = field(
        default_factory=lambda: dict.fromkeys(
            ("spec_steps", "spec_row_steps", "spec_proposed_tokens", "spec_accepted_tokens"), 0
        )
    )

    def __post_init__(self) -> None:
        self.payoff = Payoff(self.config.prior_threshold)
        self.draft = self.config.draft.fresh() if self.config.draft is not None else None
        self._last: float | None = None  # when the last decode step ended
        self._rows = 0  # how many rows it had
        self._spec_now = False  # whether the step under way speculates

    def attach(self, seq: Any) -> None:
        """Give an admitted request its proposer (or none)."""
        prediction = getattr(seq, "prediction", None)
        if seq.constraint is not None:
            seq.spec = None  # a grammar row samples one token per step (see module docstring)
        elif prediction:
            seq.spec = RowSpec(PredictionProposer(prediction), Acceptance(PRIORS["prediction"]))
        elif self.draft is not None:
            seq.spec = RowSpec(self.draft.proposer(seq), Acceptance(PRIORS["draft"]))
        elif self.config.mode == "ngram":
            seq.spec = RowSpec(NgramProposer(), Acceptance(PRIORS["ngram"]))
        else:
            seq.spec = None

    def stats(self) -> dict:
        c = self.counts
        rate = (
            c["spec_accepted_tokens"] / c["spec_proposed_tokens"]
            if c["spec_proposed_tokens"]
            else 0.0
        )
        per = (
            (c["spec_accepted_tokens"] + c["spec_row_steps"]) / c["spec_row_steps"]
            if c["spec_row_steps"]
            else 0.0
        )
        return {**c, "spec_acceptance_rate": rate, "spec_tokens_per_row_step": per}  # fmt: skip

    def tick(self, rows: int, tokens: int) -> None:
        """A decode step ended having produced `tokens` for `rows` rows: the time since the
        last one goes to the payoff."""
        now = time.perf_counter()
        if self._last is not None and rows == self._rows:  # a join's prefill is not a step cost
            self.payoff.observe(rows, self._spec_now, tokens, now - self._last)
        self._last, self._rows, self._spec_now = now, rows, False

    def idle(self) -> None:
        """The engine waits for work: the next step's time must not include the wait."""
        self._last = None

    # -- the step ------------------------------------------------------------------------

    def step(self, model: Any, batch: Any, seqs: list[Any]) -> list | None:
        """A speculative decode step, or None when no row proposes anything (the caller then
        runs a plain, overlapped step). Returns per row (tokens to emit, their extras, KV
        positions added)."""
        if not any(s.spec is not None for s in seqs) or not can_rollback(batch.caches):
            return None
        fixed = self.config.threshold is not None
        if self.config.adaptive and not fixed and self.payoff.explore(len(seqs)):
            return None  # a plain step now and then tells the payoff what speculating saves
        ks = self._ks(seqs, batch.generated)
        if not any(ks):
            return None  # decided before reading the tokens: the plain step keeps its overlap
        fed = batch.tokens.tolist()
        stopped = [
            g and t in s.stop_ids for s, t, g in zip(seqs, fed, batch.generated, strict=True)
        ]
        ks = [0 if done else k for done, k in zip(stopped, ks, strict=True)]
        rows = []
        for i, (seq, k) in enumerate(zip(seqs, ks, strict=True)):
            output = seq.generated + ([fed[i]] if batch.generated[i] else [])
            proposal = seq.spec.proposer.propose(seq.prompt, output, k) if k else []
            rows.append(_Row(i, [int(t) for t in proposal[:k]]))
        if self.draft is not None:
            self.draft.fill(rows, seqs, fed, batch.generated, ks)
        width = max(len(r.proposal) for r in rows)
        if width == 0:
            return None
        width = bucket(width)  # few distinct shapes: each new one costs a kernel compile
        tokens = mx.array(
            [[fed[r.index]] + r.proposal + [0] * (width - len(r.proposal)) for r in rows]
        )
        logits = model(tokens, cache=batch.caches)  # (B, 1 + K, V)
        self._spec_now = True
        return self._finish(batch, seqs, rows, logits, fed)

    def _ks(self, seqs: list[Any], generated: list[bool]) -> list[int]:
        """Each row's k: what its acceptance and the step's cost shape make worth proposing,
        within the tokens it may still generate (the bonus must fit too)."""
        threshold = self.config.threshold
        if threshold is None:
            threshold = self.payoff.threshold(len(seqs))
        ks = []
        for seq, gen in zip(seqs, generated, strict=True):
            left = seq.budget - len(seq.generated) - (1 if gen else 0) - 1
            if seq.spec is None or left <= 0:
                ks.append(0)
                continue
            k = self.config.max_k
            if self.config.adaptive:
                k = seq.spec.acceptance.k(threshold, k)
            ks.append(min(k, left))
        return ks

    def _finish(
        self, batch: Any, seqs: list, rows: list[_Row], logits: mx.array, fed: list
    ) -> list:
        width = logits.shape[1] - 1
        spec = [r for r in rows if r.proposal]
        plain = [r for r in rows if not r.proposal]
        for r in spec:
            self._verify(r, seqs[r.index], logits[r.index, : len(r.proposal) + 1], fed, batch)
        bonus: list[Any] = [None] * len(rows)
        extras: list[Any] = [None] * len(rows)
        if plain:
            idx = [r.index for r in plain]
            sel = mx.array(idx)
            new, ex = sample_rows(
                logits[sel, 0], [seqs[i].row for i in idx], batch.tokens[sel],
                [batch.generated[i] for i in idx],
            )  # fmt: skip
            for j, i in enumerate(idx):
                bonus[i], extras[i] = new[j : j + 1], ex[j]
        verdicts = [r.verdict for r in spec]
        mx.eval([(v.accepted, v.candidates) for v in verdicts if v is not None])
        out: list = [None] * len(rows)
        drops = [width] * len(rows)
        for r in spec:
            out[r.index], bonus[r.index], extras[r.index] = self._settle(r, seqs[r.index])
            drops[r.index] = width - len(out[r.index][0])
        rollback(batch.caches, drops)
        if self.draft is not None:  # the draft keeps what its own proposals got accepted
            self.draft.settle([_drafted(r, out[r.index], seqs[r.index]) for r in rows])
        emitted = self._emitted(batch, rows, out, fed)
        batch.tokens = mx.concatenate([mx.array(b).reshape(1).astype(mx.uint32) for b in bonus])
        batch.extras, batch.generated = extras, [True] * len(rows)
        mx.async_eval(batch.tokens, [e for e in extras if e is not None])
        self.counts["spec_steps"] += 1
        return emitted

    def _verify(self, r: _Row, seq: Any, logits: mx.array, fed: list, batch: Any) -> None:
        row, params = seq.row, seq.params
        if batch.generated[r.index] and params.has_logits_processing:
            row.process(logits[:1], mx.array([fed[r.index]]))  # the fed token joins the history
        r.logprobs = position_logprobs(logits, row.history, r.proposal, params)
        key = None if params.is_greedy else row.sampler.next_key()
        q = self.draft.probs(r) if self.draft is not None else None
        r.verdict = verify_row(r.logprobs, r.proposal, params, key, q)

    def _settle(self, r: _Row, seq: Any) -> tuple:
        """Accepted tokens, the bonus and its extras of one verified row; acceptance bookkeeping."""
        assert r.verdict is not None
        a = cast(int, r.verdict.accepted.item())
        kept = r.proposal[:a]
        bonus = cast(int, r.verdict.candidates[a].item())
        spec, k = seq.spec, len(r.proposal)
        spec.acceptance.update(k, a)
        spec.proposer.advance(k, a, bonus)
        spec.proposed += k
        spec.accepted += a
        self.counts["spec_row_steps"] += 1
        self.counts["spec_proposed_tokens"] += k
        self.counts["spec_accepted_tokens"] += a
        if seq.row.params.has_logits_processing and kept:
            hist = mx.array(kept, dtype=mx.int32)
            h = seq.row.history
            seq.row.history = hist if h is None else mx.concatenate([h, hist])
        lps = None
        if seq.params.logprobs:
            lps = token_extras(r.logprobs, kept + [bonus], seq.params.top_logprobs)
        kept_extras = lps[:-1] if lps else [None] * a
        bonus_extra = lps[-1] if lps else None
        return (kept, kept_extras), mx.array([bonus], dtype=mx.uint32), bonus_extra

    @staticmethod
    def _emitted(batch: Any, rows: list[_Row], out: list, fed: list) -> list:
        """Per row: (tokens to emit now, their extras, KV positions this step added)."""
        emitted = []
        for r in rows:
            kept, kept_extras = out[r.index] if out[r.index] is not None else ([], [])
            head = [fed[r.index]] if batch.generated[r.index] else []
            head_extra = [batch.extras[r.index]] if head else []
            emitted.append((head + kept, head_extra + kept_extras, 1 + len(kept)))
        return emitted


def _drafted(row: _Row, out: Any, seq: Any) -> int:
    """Accepted proposals of a row the draft proposed for (0 for any other row)."""
    if out is None or seq.spec is None or getattr(seq.spec.proposer, "kind", "") != "draft":
        return 0
    return len(out[0])


def bucket(n: int) -> int:
    """n rounded up to a power of two: the verify pass (and the draft's catch-up) then takes a
    handful of shapes, and MLX compiles its fused kernels once per shape, not once per step."""
    return 1 << max(n - 1, 0).bit_length()
