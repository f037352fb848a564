"""KV reuse beyond the prefix (`--cache-reuse N`), after llama.cpp's cache reuse.

A client that inserts text in the middle of a long prompt (an agent's system reminder, an edited
snippet) would have every token after the edit prefilled again. Here, once the prefix cache has
matched what it can, the cached path that diverged is searched for runs of >= N tokens that
reappear in the new prompt further on (`find_segments`). Each run's cached KV is moved to its
new position: values as they are, keys re-rotated by the position delta. RoPE turns a key at
position p by angles p*theta_i, so turning it again by delta*theta_i gives the key at p + delta
(`Rotation`). Only the gaps between the runs are prefilled; the engine splices each run into
the request's cache when its prefill reaches it (`ReusePlan.splice`).

This is an approximation, as in llama.cpp: a reused token's KV was computed with the left
context it had before the edit, not the new one, so outputs can differ slightly from a full
prefill. It is off by default. The KV of a request that reused chunks goes to the prefix cache
like any other (again as llama.cpp keeps a slot's shifted cache).

Only models where re-rotation is exact are accepted (`ChunkReuse.for_model`): every layer's
attention has a rope module of a known kind whose rotation is a pure offset (mlx's RoPE with any
dims/base/traditional/linear scale, Llama 3, YaRN and LongRoPE frequencies; not dynamic NTK,
whose frequencies depend on the sequence length), and a probe on layer 0 checks that the cached
keys are laid out as that rotation expects (a DeepSeek-style half-rotated key fails it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import mlx.core as mx
import mlx.nn as nn

from mlxrun.cache import KVBlock, concat_blocks

if TYPE_CHECKING:
    from mlxrun.batch import RequestState
    from mlxrun.models import ModelProtocol
    from mlxrun.prefix_cache import RadixCache

log = logging.getLogger(__name__)

ANCHOR = 16  # tokens hashed to find candidate runs (runs are then extended token by token)
MAX_CANDIDATES = 8  # cached positions tried per anchor (repetitive text has many)
PROBE_TOLERANCE = 0.05  # relative: bf16 keys round at ~4e-3, a wrong layout is off by O(1)

Rotate = Callable[[mx.array, int], mx.array]


# ------------------------------------------------------------------ matching (pure)


@dataclass(frozen=True)
class Segment:
    start: int  # position in the new prompt
    source: int  # position in the cached path (from the root)
    length: int

    @property
    def delta(self) -> int:
        return self.start - self.source


def _run_length(a: Sequence[int], i: int, b: Sequence[int], j: int) -> int:
    n, limit = 0, min(len(a) - i, len(b) - j)
    while n < limit and a[i + n] == b[j + n]:
        n += 1
    return n


def find_segments(
    cached: Sequence[int], cached_start: int, prompt: Sequence[int], start: int, min_len: int
) -> list[Segment]:
    """Runs of >= min_len tokens of `cached` (whose first token sits at `cached_start`) that
    reappear in `prompt` at or after `start`, left to right without overlap, longest first at
    each prompt position."""
    if min_len < 1 or len(cached) < min_len:
        return []
    k = min(min_len, ANCHOR)
    index: dict[tuple[int, ...], list[int]] = {}
    for j in range(len(cached) - min_len + 1):
        hits = index.setdefault(tuple(cached[j : j + k]), [])
        if len(hits) < MAX_CANDIDATES:
            hits.append(j)
    segments, i = [], start
    while i + min_len <= len(prompt):
        best_j, best_n = 0, 0
        for j in index.get(tuple(prompt[i : i + k]), ()):
            n = _run_length(prompt, i, cached, j)
            if n > best_n:
                best_j, best_n = j, n
        if best_n >= min_len:
            segments.append(Segment(i, cached_start + best_j, best_n))
            i += best_n
        else:
            i += 1
    return segments


# ------------------------------------------------------------------ re-rotation


def rotation(rope: Any) -> tuple[Rotate | None, str]:
    """(a function turning keys (..., L, D) by a position delta, '') for a rope module whose
    rotation is a pure offset; (None, why not) otherwise."""
    from mlx_lm.models import rope_utils as ru

    if type(rope) in (nn.RoPE, ru.Llama3RoPE, ru.ProportionalRoPE):
        # Position-independent frequencies and no input scaling: the module itself turns by delta.
        return (lambda k, d: rope(k, offset=d)), ""
    if type(rope) is ru.YarnRoPE:  # skip its magnitude scale (mscale): keys already carry it
        dims, trad = rope.dims, rope.traditional
        return (lambda k, d: _turn(k, d, dims, trad, rope._freqs)), ""
    if type(rope) is ru.SuScaledRoPE:  # LongRoPE: likewise without its input scale
        dims = rope.dim
        return (lambda k, d: _turn(k, d, dims, False, rope._freqs)), ""
    if type(rope) is ru.DynamicNTKScalingRoPE:
        return None, "dynamic NTK rope: its frequencies change with the sequence length"
    return None, f"rope module {type(rope).__name__} is not known to rotate by a pure offset"


def _turn(k: mx.array, delta: int, dims: int, traditional: bool, freqs: mx.array) -> mx.array:
    return mx.fast.rope(
        k, dims, traditional=traditional, base=None, scale=1.0, offset=delta, freqs=freqs
    )


def rerotate(keys: mx.array, delta: int, rotate: Rotate) -> mx.array:
    """Keys (B, H, L, D) cached at positions p.. turned to p + delta.. (fp32 inside).

    Each token is its own length-1 sequence, so rope turns every one by `delta` (rope over a
    sequence would add the token's index too)."""
    if delta == 0:
        return keys
    turned = rotate(keys.astype(mx.float32)[..., None, :], delta)  # (B, H, L, 1, D)
    return turned[..., 0, :].astype(keys.dtype)


def _layer_rope(layer: Any) -> Any:
    for name in ("self_attn", "attention", "attn"):
        attn = getattr(layer, name, None)
        if attn is not None:
            return getattr(attn, "rope", None)
    return None


# ------------------------------------------------------------------ plans


@dataclass
class ReusePlan:
    """Reused runs of one request, rotated to their new positions, spliced into its cache as its
    prefill reaches them. `reused` counts the tokens spliced so far."""

    runs: list[tuple[int, KVBlock]]  # (start in the prompt, KV already turned to that position)
    counts: dict[str, int] = field(default_factory=dict)  # the ChunkReuse's, bumped on splices
    reused: int = 0
    _next: int = field(default=0, repr=False)

    def next_start(self) -> int | None:
        return self.runs[self._next][0] if self._next < len(self.runs) else None

    def clip(self, stop: int) -> int:
        """Where a prefill chunk meant to end at `stop` must end: at the next run's start."""
        start = self.next_start()
        return stop if start is None else min(stop, start)

    def splice(self, seq: RequestState) -> int:
        """Append the runs that start where `seq` (a batch.RequestState) has prefilled to its
        cache, and move it past them; returns the tokens added."""
        added = 0
        while self.next_start() == seq.computed + added:
            block = self.runs[self._next][1]
            for c, (k, v) in zip(seq.cache, block.layers, strict=True):
                c.update_and_fetch(k, v)
            added += block.length
            self.runs[self._next] = (self.runs[self._next][0], KVBlock([]))  # let it go
            self._next += 1
            self.counts["reuse_chunks"] = self.counts.get("reuse_chunks", 0) + 1
        seq.computed, seq.kv, seq.cached = seq.computed + added, seq.kv + added, seq.cached + added
        self.reused += added
        self.counts["reuse_chunk_tokens"] = self.counts.get("reuse_chunk_tokens", 0) + added
        return added


class ChunkReuse:
    """Finds reusable runs for a model that allows it; see the module docstring."""

    def __init__(self, rotations: list[Rotate], min_len: int, radix: RadixCache | None = None):
        self.rotations, self.min_len, self.radix = rotations, min_len, radix
        self.counts = dict.fromkeys(("reuse_chunks", "reuse_chunk_tokens", "reuse_misses"), 0)

    @classmethod
    def for_model(
        cls, model: ModelProtocol, min_len: int, radix: RadixCache | None
    ) -> ChunkReuse | None:
        """A ChunkReuse over `radix` (the engine's RadixCache), or None (and why, in the log)."""
        reuse, why = cls.check(model, min_len)
        if radix is None:
            reuse, why = None, "the prefix cache is off"
        if reuse is None:
            log.info("cache reuse is off: %s", why)
            return None
        reuse.radix = radix
        return reuse

    @classmethod
    def check(cls, model: ModelProtocol, min_len: int) -> tuple[ChunkReuse | None, str]:
        """(a ChunkReuse, '') or (None, why this model cannot reuse chunks)."""
        layers = getattr(model, "layers", None)
        if not layers:
            return None, "the model has no layers list"
        rotations = []
        for i, layer in enumerate(layers):
            rope = _layer_rope(layer)
            if rope is None:
                return None, f"layer {i} has no rope module (self_attn.rope)"
            rotate, why = rotation(rope)
            if rotate is None:
                return None, f"layer {i}: {why}"
            rotations.append(rotate)
        reuse = cls(rotations, min_len)
        why = reuse._probe(model)
        return (None, why) if why else (reuse, "")

    def _probe(self, model: ModelProtocol) -> str:
        """Layer 0's keys depend on the token and its position only: the keys of tokens at 8..11
        must equal those at 0..3 turned by 8, or the cache's layout is not what we rotate."""
        from mlxrun import models

        toks = [1, 2, 3, 4]
        first, later = models.make_cache(model), models.make_cache(model)
        model(mx.array([toks]), cache=first)
        model(mx.array([[5] * 8 + toks]), cache=later)
        try:
            k0 = first[0].keys[:, :, :4].astype(mx.float32)  # (1, n_kv_heads, 4, head_dim)
            k8 = later[0].keys[:, :, 8:12].astype(mx.float32)
        except (AttributeError, TypeError, IndexError):
            return f"the cache ({type(first[0]).__name__}) holds no plain keys array"
        err = cast(float, mx.abs(rerotate(k0, 8, self.rotations[0]) - k8).max().item())
        scale = max(cast(float, mx.abs(k8).max().item()), 1e-6)
        if err > PROBE_TOLERANCE * scale:
            return f"re-rotated layer-0 keys are off by {err / scale:.2g} (relative)"
        return ""

    def plan_for(self, seq: RequestState, hit: int) -> ReusePlan | None:
        """The plan for a request just admitted with a `hit`-token prefix (a batch.RequestState);
        None, and why in the debug log, when nothing past the prefix can be reused."""
        tokens = seq.prompt[:-1]  # the last token is always computed
        if hit >= len(tokens):
            return None
        assert self.radix is not None  # for_model gives it one
        length, paths = self.radix.continuations(seq.namespace, tokens)
        if length != hit:
            plan, why = None, "the prefix came from the disk tier"
        else:
            plan, why = self.plan(tokens, hit, paths)
        if plan is None:
            self.counts["reuse_misses"] += 1
            log.debug("%s: no KV reuse past the %d-token prefix: %s", seq.id, hit, why)
        return plan

    def plan(
        self, prompt: Sequence[int], hit: int, paths: Sequence[tuple[Sequence[int], list[Any]]]
    ) -> tuple[ReusePlan | None, str]:
        """The best plan over the cached `paths` that diverged at `hit` (each (tokens, blocks),
        its tokens from position `hit`), for the tokens `prompt` (the prompt but its last)."""
        best: tuple[int, list[Segment], Any] = (0, [], None)
        for tokens, blocks in paths:
            segments = find_segments(tokens, hit, prompt, hit, self.min_len)
            total = sum(s.length for s in segments)
            if total > best[0]:
                best = (total, segments, blocks)
        _, segments, blocks = best
        if not segments:
            why = f"no run of >= {self.min_len} cached tokens reappears after position {hit}"
            return None, why if paths else "no cached path goes on past the prefix"
        whole = concat_blocks(blocks)
        runs = []
        for s in segments:
            part = whole.slice(s.source - hit, s.source - hit + s.length)
            layers = [
                (rerotate(k, s.delta, rot), v)
                for (k, v), rot in zip(part.layers, self.rotations, strict=True)
            ]
            runs.append((s.start, KVBlock(layers, materialized=False).materialize()))
        return ReusePlan(runs, self.counts), ""
