"""The prefix cache's disk tier: one file per segment of a token path, chained by hash.

A token path (a namespace's prompt + generated tokens) is cut into fixed chunks of
`chunk_tokens` tokens (the last one may be shorter). A segment's key hashes its parent's key with
its own token ids; the first segment's parent is the namespace's root key, which hashes the file
format, the model fingerprint (weights and KV layout) and the namespace. So:

- a shared prefix is stored once: siblings share every chunk before the one they diverge in and
  store only their own tails;
- lookup is a dict lookup per chunk boundary (the keys of a prompt's chunks are computed from the
  prompt alone), then one look over the last matched segment's children for the longest
  common prefix (a prompt may end, or diverge, inside a chunk: a partial match loads the
  first tokens of that segment);
- files written under other weights, another KV layout or format never match, and are deleted.

Fixed chunks rather than the radix tree's node boundaries: node boundaries depend on the order
requests came in (edges split as prefixes are found) and would differ after a restart, so a
prompt could not compute the keys to look up. A chunk of 256 tokens is ~32 MiB at 8B shapes:
large enough that per-file costs (open, header, fs metadata) don't matter, small enough that
siblings duplicate little (at most the chunk they diverge in).

Threads: the engine thread calls `offer` (on eviction: turns the new segments' KV into numpy
arrays, queues them, returns), `lookup`/`fetch` (dict walks; the read runs on a reader thread)
and `Prefetch.block`. A writer thread writes queued segments and enforces the byte budget. Queued
bytes are bounded (`max_pending_bytes`): past it a segment and the rest of its path are dropped,
never waited for. Queued segments can be matched and read from memory before they are written.

Budget: LRU over leaf segments only (a segment with children on disk stays until they go), so the
index never holds a segment whose parent is gone. Files are 0600 in a 0700 directory,
`<cache_dir>/v2-<model id hash>/<key>.safetensors`; see mlxrun.kv_files for the file checks.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from mlxrun import kv_files
from mlxrun.kv_files import FORMAT, BadSegment

if TYPE_CHECKING:
    from mlxrun.kv_quant import KVQuant
    from mlxrun.models import ModelProtocol

CHUNK_TOKENS = 256
MAX_PENDING_BYTES = 512 << 20


def _hash(*parts: bytes) -> str:
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(len(p).to_bytes(8, "little") + p)
    return h.hexdigest()


def chain_key(parent: str, tokens: Sequence[int]) -> str:
    return _hash(parent.encode(), np.asarray(tokens, dtype=np.int64).tobytes())


def model_fingerprint(model: ModelProtocol, layout: list) -> str:
    """Weights (names, shapes, dtypes and a strided sample of each tensor) and the KV layout:
    a re-conversion or another fine-tune changes it; a reload of the same files does not."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps([FORMAT, layout]).encode())
    samples = []
    for name, p in cast("list[tuple[str, mx.array]]", tree_flatten(model.parameters())):
        h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        flat = p.reshape(-1)
        samples.append(mx.contiguous(flat[:: max(1, flat.size // 64)][:64]).view(mx.uint8))
    mx.eval(samples)
    for s in samples:
        h.update(np.array(s).tobytes())
    return h.hexdigest()


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@dataclass(eq=False)
class _Segment:
    key: str
    parent: str
    namespace: str  # JSON of the namespace tuple
    tokens: tuple[int, ...]
    last_use: float
    size: int = 0  # bytes on disk; 0 while queued
    arrays: dict | None = None  # the KV while queued (numpy)
    header: tuple[dict, int] | None = None  # (safetensors header, data start) once on disk
    quant: str = ""  # KV precision as kv_files.quant_text writes it ("" = full)
    children: set[str] = field(default_factory=set)


@dataclass
class Prefetch:
    """A disk read started for an admitted request: tokens [start, length) of its prompt."""

    start: int
    length: int
    future: Future
    quant: str = ""  # the precision of the segments read (one per read)

    def done(self) -> bool:
        return self.future.done()

    def block(self) -> tuple[Any, int]:
        """(KVBlock of tokens [start, end), end) on the engine thread; (None, start) if the
        read failed at its first segment."""
        try:
            arrays, end = self.future.result()
        except Exception:  # a read that failed is a miss, never the engine's failure
            return None, self.start
        if arrays is None:
            return None, self.start
        return kv_files.arrays_block(arrays, kv_files.parse_quant(self.quant)), end


class DiskTier:
    def __init__(
        self,
        root: str | Path,
        *,
        model_id: str,
        fingerprint: str,
        layout: list,
        budget_bytes: int,
        chunk_tokens: int = CHUNK_TOKENS,
        max_pending_bytes: int = MAX_PENDING_BYTES,
    ):
        self.dir = Path(root) / f"v2-{_hash(model_id.encode())[:16]}"
        for d in (Path(root), self.dir):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)  # mkdir's mode is cut by the umask; an old dir may be wider
        self.fingerprint, self.layout = fingerprint, layout
        self.budget_bytes, self.chunk = int(budget_bytes), int(chunk_tokens)
        self.max_pending_bytes = max_pending_bytes
        self.wait_when_full = False  # set for a shutdown: everything is written, nothing dropped
        self._lock = threading.Lock()
        self._index: dict[str, _Segment] = {}
        self._roots: dict[str, set[str]] = {}  # root key -> first segments
        self._bytes = self._pending = 0
        self._counts = dict.fromkeys(
            ("writes", "dropped", "evicted", "bad_files", "hits", "hit_tokens", "write_errors"), 0
        )
        self._scan()
        self._queue: queue.SimpleQueue[_Segment | None] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write_loop, name="mlxrun-disk-write")
        self._writer.daemon = True
        self._writer.start()
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="mlxrun-disk-read")

    # -- keys and the index (callers hold the lock) ------------------------------------------

    def root_key(self, namespace: tuple | str) -> str:
        ns = namespace if isinstance(namespace, str) else json.dumps(list(namespace))
        return _hash(FORMAT.encode(), self.fingerprint.encode(), ns.encode())

    def _children(self, key: str) -> set[str]:
        seg = self._index.get(key)
        return seg.children if seg is not None else self._roots.get(key, set())

    def _add(self, seg: _Segment) -> None:
        self._index[seg.key] = seg
        if seg.parent in self._index:
            self._index[seg.parent].children.add(seg.key)
        else:
            self._roots.setdefault(seg.parent, set()).add(seg.key)
        self._bytes += seg.size

    def _remove(self, key: str) -> list[Path]:
        """Drop a segment and its descendants; returns their files (unlink outside the lock)."""
        seg = self._index.pop(key, None)
        if seg is None:
            return []
        self._children(seg.parent).discard(key)
        self._bytes -= seg.size
        if seg.arrays is not None:
            self._pending -= _nbytes(seg.arrays)
        paths = [self.dir / f"{key}.safetensors"] if seg.size else []
        for child in list(seg.children):
            paths += self._remove(child)
        return paths

    @property
    def total_bytes(self) -> int:
        return self._bytes

    def stats(self) -> dict:
        with self._lock:
            return {**self._counts, "segments": len(self._index), "bytes": self._bytes,
                    "queued_bytes": self._pending, "budget_bytes": self.budget_bytes}  # fmt: skip

    # -- startup ------------------------------------------------------------------------------

    def _scan(self) -> None:
        """Index the files a previous run left; delete torn, foreign or orphaned ones."""
        found: dict[str, _Segment] = {}
        for path in self.dir.iterdir():
            if path.name.startswith(".tmp-"):
                path.unlink(missing_ok=True)  # a write a crash cut short
                continue
            try:
                seg = self._check_file(path)
            except (BadSegment, KeyError, ValueError, TypeError):
                path.unlink(missing_ok=True)
                self._counts["bad_files"] += 1
                continue
            found[seg.key] = seg
        # Only segments reachable from a root can be matched: the rest are orphans.
        below: dict[str, list[_Segment]] = {}
        for seg in found.values():
            below.setdefault(seg.parent, []).append(seg)
        todo = [s for s in found.values() if s.parent == self.root_key(s.namespace)]
        while todo:
            seg = todo.pop()
            self._add(seg)
            todo += below.get(seg.key, [])
        for key in found.keys() - self._index.keys():
            (self.dir / f"{key}.safetensors").unlink(missing_ok=True)
            self._counts["bad_files"] += 1
        _unlink(self._enforce_budget())  # the budget may be smaller than last run's

    def _check_file(self, path: Path) -> _Segment:
        header, start = kv_files.read_header(path)
        meta = header["__metadata__"]
        if meta.get("format") != FORMAT or meta.get("fingerprint") != self.fingerprint:
            raise BadSegment("written for another format or other weights")
        tokens = tuple(int(t) for t in json.loads(meta["tokens"]))
        key = chain_key(meta["parent"], tokens)
        if not tokens or path.name != f"{key}.safetensors":
            raise BadSegment("the name does not match the contents")
        kv_files.check_layout(header, self.layout, len(tokens))
        st = path.stat()
        return _Segment(key, meta["parent"], meta["namespace"], tokens, st.st_mtime,
                        st.st_size, header=(header, start),
                        quant=str(meta.get("kv_quant", "")))  # fmt: skip

    # -- lookup and reads (engine thread; reads on the reader thread) ---------------------------

    def lookup(
        self, namespace: tuple, tokens: Sequence[int], quant: str = ""
    ) -> list[tuple[str, int]]:
        """The chain of segments matching the longest prefix of `tokens`: [(key, tokens used)].
        Only segments a `quant` engine loses nothing by reading count: its own precision, or full
        precision (quantized on load); a full engine never reads quantized KV."""
        usable = ("", quant)
        chain: list[tuple[str, int]] = []
        parent, i, c = self.root_key(namespace), 0, self.chunk
        with self._lock:
            while i + c <= len(tokens):
                key = chain_key(parent, tokens[i : i + c])
                if key not in self._index or self._index[key].quant not in usable:
                    break
                chain.append((key, c))
                parent, i = key, i + c
            rest = tokens[i : i + c]
            best = max(
                (
                    (_common(self._index[k].tokens, rest), k)
                    for k in self._children(parent)
                    if self._index[k].quant in usable
                ),
                default=(0, ""),
            )
            if best[0]:
                chain.append((best[1], best[0]))
        return chain

    def fetch(
        self, namespace: tuple, tokens: Sequence[int], have: int, quant: KVQuant | None = None
    ) -> Prefetch | None:
        """Start reading what the disk holds beyond the first `have` tokens for an engine whose
        KV precision is `quant` (a KVQuant; None = full); None if nothing."""
        chain = self.lookup(namespace, tokens, kv_files.quant_text(quant))
        ends = np.cumsum([n for _, n in chain]).tolist()
        if not chain or ends[-1] <= have:
            return None
        first = next(j for j, e in enumerate(ends) if e > have)
        start = ends[first - 1] if first else 0
        now = time.time()
        segs = []
        with self._lock:
            for k, n in chain[first:]:
                if k not in self._index:
                    break  # evicted since the lookup: read what is left of the chain
                self._index[k].last_use = now
                segs.append((self._index[k], n))
        # One precision per read: the chain stops where a segment's differs from the first's.
        segs = list(itertools.takewhile(lambda sn: sn[0].quant == segs[0][0].quant, segs))
        if not segs:
            return None
        length = start + sum(n for _, n in segs)
        future = self._reader.submit(self._read_chain, segs, start)
        return Prefetch(start, length, future, segs[0][0].quant)

    def _read_chain(self, segs: list[tuple[_Segment, int]], start: int) -> tuple[dict | None, int]:
        """Read segments in order (numpy, concatenated); stops at the first bad one."""
        parts, end = [], start
        for seg, n in segs:
            try:
                arrays = seg.arrays
                if arrays is None:
                    arrays = self._read_file(seg)
                    os.utime(self.dir / f"{seg.key}.safetensors")  # LRU order survives restarts
            except (BadSegment, OSError):
                with self._lock:
                    paths = self._remove(seg.key)
                    self._counts["bad_files"] += 1
                _unlink(paths)
                break
            parts.append(kv_files.slice_tokens(arrays, 0, n))
            end += n
        if not parts:
            return None, start
        with self._lock:
            self._counts["hits"] += 1
            self._counts["hit_tokens"] += end - start
        merged = {
            name: (st, np.concatenate([p[name][1] for p in parts], axis=2))
            for name, (st, _) in parts[0].items()
        }
        return merged, end

    def _read_file(self, seg: _Segment) -> dict:
        """Hook (tests slow it down): a written segment's arrays, checked."""
        path = self.dir / f"{seg.key}.safetensors"
        header, start = seg.header or kv_files.read_header(path)
        kv_files.check_layout(header, self.layout, len(seg.tokens))
        return kv_files.read_segment(path, header, start)

    # -- writes (offer on the engine thread; the writer thread writes) ------------------------

    def offer(self, namespace: tuple, token_path: Sequence[int], values: Sequence[Any]) -> int:
        """The radix cache's on_evict: queue the path's segments not on disk yet. Returns how
        many were queued. Never waits on the disk."""
        ns = json.dumps(list(namespace))
        parent, i, queued = self.root_key(ns), 0, 0
        while i < len(token_path):
            piece = tuple(token_path[i : i + self.chunk])
            key = chain_key(parent, piece)
            with self._lock:
                known = key in self._index
                covered = any(
                    self._index[k].tokens[: len(piece)] == piece for k in self._children(parent)
                )
                full = self._pending >= self.max_pending_bytes
            while full and self.wait_when_full and not known and not covered:
                time.sleep(0.005)
                with self._lock:
                    full = self._pending >= self.max_pending_bytes
            if not known:
                if covered:  # a longer sibling holds these tokens already
                    break
                if full:
                    self._counts["dropped"] += 1
                    break
                block = _tokens_range(values, i, i + len(piece))
                arrays = kv_files.block_arrays(block)
                seg = _Segment(key, parent, ns, piece, time.time(), arrays=arrays,
                               quant=kv_files.quant_text(block.quant))  # fmt: skip
                with self._lock:
                    self._add(seg)
                    self._pending += _nbytes(arrays)
                self._queue.put(seg)
                queued += 1
            parent, i = key, i + len(piece)
        return queued

    def _write_loop(self) -> None:
        while (seg := self._queue.get()) is not None:
            with self._lock:
                if self._index.get(seg.key) is not seg:
                    continue  # dropped while queued (a bad parent, a longer sibling)
            path = self.dir / f"{seg.key}.safetensors"
            meta = {"fingerprint": self.fingerprint, "namespace": seg.namespace,
                    "parent": seg.parent, "tokens": json.dumps(list(seg.tokens)),
                    "kv_quant": seg.quant}  # fmt: skip
            try:
                size = self._write_file(path, seg.arrays, meta)
            except OSError:
                with self._lock:
                    self._counts["write_errors"] += 1
                    paths = self._remove(seg.key)
                _unlink(paths)
                continue
            with self._lock:
                if self._index.get(seg.key) is not seg:
                    paths = [path]
                else:
                    self._pending -= _nbytes(seg.arrays or {})
                    seg.arrays, seg.size = None, size
                    self._bytes += size
                    self._counts["writes"] += 1
                    paths = self._prune_siblings(seg) + self._enforce_budget()
            _unlink(paths)

    def _write_file(self, path: Path, arrays: Any, meta: dict) -> int:
        """Hook (tests slow it down): write one segment file."""
        return kv_files.write_segment(path, arrays, meta)

    def _prune_siblings(self, seg: _Segment) -> list[Path]:
        """Shorter siblings whose tokens `seg` starts with are redundant."""
        paths = []
        for k in list(self._children(seg.parent)):
            sib = self._index[k]
            n = len(sib.tokens)
            if sib is not seg and n < len(seg.tokens) and seg.tokens[:n] == sib.tokens:
                if not sib.children:
                    paths += self._remove(k)
        return paths

    def _enforce_budget(self) -> list[Path]:
        paths: list[Path] = []
        while self._bytes > self.budget_bytes:
            leaves = [s for s in self._index.values() if s.size and not s.children]
            if not leaves:
                break
            victim = min(leaves, key=lambda s: s.last_use)
            paths += self._remove(victim.key)
            self._counts["evicted"] += 1
        return paths

    def close(self) -> None:
        """Finish the queued writes and stop the threads."""
        self._queue.put(None)
        self._writer.join()
        self._reader.shutdown(wait=True)


def _nbytes(arrays: dict) -> int:
    return sum(a.nbytes for _, a in arrays.values())


def _unlink(paths: list[Path]) -> None:
    for p in paths:
        p.unlink(missing_ok=True)


def _tokens_range(values: Sequence[Any], start: int, end: int) -> Any:
    """Tokens [start, end) of a path given as consecutive KV blocks, as one (lazy) block."""
    from mlxrun.cache import concat_blocks

    pieces, offset = [], 0
    for block in values:
        lo, hi = max(start, offset), min(end, offset + block.length)
        if lo < hi:
            pieces.append(block.slice(lo - offset, hi - offset))
        offset += block.length
    return concat_blocks(pieces)
