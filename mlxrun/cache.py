"""KV storage for the engine: KV blocks (the prefix cache's values), request caches built from
them, rows cut out of the decode batch, and the disk tier.

A `KVBlock` holds the keys and values of a run of tokens, per layer, each `(1, n_kv_heads, L,
head_dim)`. The radix index (mlxrun.prefix_cache) treats blocks as opaque and reaches them only
through `block_nbytes` and `split_block`.

Blocks cut from the decode batch start out lazy (slices of the whole batch buffer); they are
copied into buffers of their own before they are kept (`KVBlock.materialize`), or a kept block
would pin the batch's memory.

The disk tier (`DiskCache`) keeps one safetensors file per evicted token path under
`cache_dir/<namespace hash>/`: arrays `<layer>.keys` / `<layer>.values`, token ids and the
namespace in the metadata. Files are written to a temporary name and renamed, survive restarts
(the directory is scanned at start), and are bounded by a byte budget (LRU by mtime).

Cache files are not a back door: directories are made 0700 and files 0600; each file carries a
fingerprint (an HMAC, under a key kept in the cache directory, of its metadata and tensor layout),
and a file whose header, shapes or fingerprint do not check out is removed, never loaded.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_map

from mlxrun.kv_quant import KVQuant, quant_of

FORMAT = "mlxrun-kv-1"
_KEY_FILE = ".fingerprint-key"
_KV_DTYPES = frozenset({"F16", "BF16", "F32"})
_SAFETENSORS_DTYPE = {mx.float16: "F16", mx.bfloat16: "BF16", mx.float32: "F32"}


class KVBlock:
    """Keys and values of a run of tokens: `layers[i] = (keys, values)`, each (1, H, L, D), or
    with `quant` (mlxrun.kv_quant.KVQuant) each a quantized triple (weights, scales, biases) of
    shape (1, H, L, ·): a quantized block is ~2x (8-bit) or ~3.5x (4-bit) smaller."""

    __slots__ = ("layers", "materialized", "quant")

    def __init__(
        self,
        layers: Sequence[tuple[Any, Any]],
        materialized: bool = True,
        quant: KVQuant | None = None,
    ):
        self.layers = tuple((k, v) for k, v in layers)
        self.materialized = materialized
        self.quant = quant

    @property
    def length(self) -> int:
        return int(_first_leaf(self.layers[0][0]).shape[2]) if self.layers else 0

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in _leaves(self.layers))

    def _map(self, fn: Any, materialized: bool) -> KVBlock:
        return KVBlock(tree_map(fn, list(self.layers)), materialized, self.quant)

    def materialize(self) -> KVBlock:
        """Copy into buffers of its own (asynchronously), releasing whatever it was sliced from."""
        if not self.materialized:
            self.layers = self._map(mx.contiguous, True).layers
            mx.async_eval(_leaves(self.layers))
            self.materialized = True
        return self

    def slice(self, start: int, end: int | None = None) -> KVBlock:
        """Tokens [start, end) as a lazy block (materialize it before keeping it)."""
        return self._map(lambda x: x[:, :, start:end], False)

    def to_precision(self, quant: KVQuant | None) -> KVBlock:
        """This block at another precision (itself when it already is)."""
        if quant == self.quant:
            return self
        layers = []
        for k, v in self.layers:
            if self.quant is not None:
                k, v = self.quant.dequantize(k), self.quant.dequantize(v)
            if quant is not None:
                k, v = quant.quantize(k), quant.quantize(v)
            layers.append((k, v))
        return KVBlock(layers, False, quant)


def _first_leaf(x: Any) -> mx.array:
    return x[0] if isinstance(x, tuple) else x


def _leaves(layers: Any) -> list[mx.array]:
    return [leaf for _, leaf in tree_flatten(list(layers))]


def block_nbytes(block: KVBlock) -> int:
    return block.nbytes


def split_block(block: KVBlock, k: int) -> tuple[KVBlock, KVBlock]:
    """(first k tokens, rest). A lazy block's first part stays lazy: the radix index drops it when
    it is already stored, so it is never computed. A stored block is split into two copies."""
    first, rest = block.slice(0, k), block.slice(k)
    if block.materialized:
        first.materialize()
    return first, rest.materialize()


def concat_blocks(blocks: Sequence[KVBlock]) -> KVBlock:
    """One block of the blocks' tokens in order, at the first block's precision."""
    if len(blocks) == 1:
        return blocks[0]
    quant = blocks[0].quant
    same = [b.to_precision(quant) for b in blocks]
    layers = zip(*(b.layers for b in same), strict=True)
    cat = lambda *xs: mx.concatenate(xs, axis=2)  # noqa: E731
    return KVBlock([tree_map(cat, *kvs) for kvs in layers], False, quant)


def supports_prefix_cache(cache: Sequence[Any]) -> bool:
    """Plain KVCache layers only (or their quantized form): their KV at a position depends on the
    tokens before it and nothing else, so it can be cut, stored and reused. Sliding windows and
    SSM states cannot."""
    from mlx_lm.models.cache import KVCache, QuantizedKVCache

    return all(type(c) in (KVCache, QuantizedKVCache) for c in cache)


def kv_bytes_per_token(cache: Sequence[Any]) -> int:
    """KV bytes one token takes across the layers of a cache that holds at least one token."""
    return sum(
        x[:, :, :1].nbytes
        for c in cache
        if getattr(c, "keys", None) is not None
        for x in _leaves([(c.keys, c.values)])
    )


def cache_from_blocks(blocks: Sequence[KVBlock], fresh: list) -> list:
    """Fill `fresh` (a new per-request KVCache or QuantizedKVCache list) with the blocks' tokens,
    in order, converted to the cache's precision where a block was stored at another."""
    quant = quant_of(fresh[0])
    whole = concat_blocks([b.to_precision(quant) for b in blocks])
    for c, (k, v) in zip(fresh, whole.layers, strict=True):
        c.keys, c.values = tree_map(mx.contiguous, (k, v))
        c.offset = int(_first_leaf(k).shape[2])
    mx.eval(_leaves([(c.keys, c.values) for c in fresh]))
    return fresh


def block_from_cache(cache: Sequence[Any], num_tokens: int, row: int = 0) -> KVBlock | None:
    """The last `num_tokens` positions of batch row `row` as a lazy block. Works for a request's
    own cache (row 0) and for the decode batch's batch caches, whose rows are left-padded: a
    row's tokens are always the last ones. A quantized cache gives a quantized block."""
    if num_tokens <= 0 or cache[0].empty():
        return None
    layers = []
    for c in cache:
        kv = c.keys_and_values()  # (B, H, size, D), or quantized triples of that layout
        layers.append(tree_map(lambda x: x[row : row + 1, :, -num_tokens:], kv))
    return KVBlock(layers, materialized=False, quant=quant_of(cache[0]))


# ---------------------------------------------------------------------------- disk tier


@dataclass
class _DiskEntry:
    path: Path
    tokens: np.ndarray  # (L,) int64
    size: int
    mtime: float
    layout: list = field(default_factory=list)  # [(name, dtype, shape)] as validated


def _private_dir(path: Path, tighten: bool = True) -> None:
    """Make `path` 0700 (the cache holds people's prompts); `tighten` also fixes an existing one
    (our namespace folders; the root may be a directory the user made and shares)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if tighten and path.stat().st_mode & 0o077:
        os.chmod(path, 0o700)


def _private_file(path: Path) -> Any:
    """A new file opened for writing, created 0600 (never through a loose umask)."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")


def _fingerprint_key(root: Path) -> bytes:
    """This cache directory's secret: files written under another key do not validate."""
    path = root / _KEY_FILE
    try:
        key = path.read_bytes()
        if len(key) == 32:
            return key
    except OSError:
        pass
    key = os.urandom(32)
    tmp = root / f".tmp-key-{uuid.uuid4().hex}"
    with _private_file(tmp) as f:
        f.write(key)
    os.replace(tmp, path)
    return key


def _layout(header: dict) -> list:
    return sorted((name, m["dtype"], [int(d) for d in m["shape"]]) for name, m in header.items())


def _fingerprint(key: bytes, meta: dict, layout: list) -> str:
    signed = json.dumps([FORMAT, meta["namespace"], meta["tokens"], layout])
    return hmac.new(key, signed.encode(), hashlib.sha256).hexdigest()


def _shapes_ok(layout: list, tokens: np.ndarray) -> bool:
    """`<i>.keys` / `<i>.values` for i = 0..n-1, each (1, heads, len(tokens), dim), K and V alike."""
    shapes = {name: (dtype, shape) for name, dtype, shape in layout}
    n = len(shapes) // 2
    if n == 0 or len(shapes) != 2 * n:
        return False
    for i in range(n):
        k, v = shapes.get(f"{i}.keys"), shapes.get(f"{i}.values")
        if k is None or v is None or k[0] not in _KV_DTYPES or k[0] != v[0]:
            return False
        if len(k[1]) != 4 or k[1][0] != 1 or k[1][2] != len(tokens) or v[1][:3] != k[1][:3]:
            return False
    return True


def _namespace_key(namespace: tuple) -> str:
    return hashlib.sha1(json.dumps(list(namespace), default=str).encode()).hexdigest()[:16]


def _touch(path: Path) -> float:
    """Set mtime to now, explicitly: the kernel's own stamp is coarse enough to tie."""
    now = time.time()
    os.utime(path, (now, now))
    return now


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


class DiskCache:
    """Prefix KV files on disk, looked up by longest common prefix within a namespace."""

    def __init__(self, root: str | Path, budget_bytes: int):
        self.root = Path(root)
        self.budget_bytes = int(budget_bytes)
        self._entries: dict[str, list[_DiskEntry]] = {}
        self._counts = {"hits": 0, "hit_tokens": 0, "writes": 0, "deleted": 0, "rejected": 0}
        _private_dir(self.root, tighten=False)
        self._key = _fingerprint_key(self.root)
        self._scan()

    # -- index -------------------------------------------------------------------------------

    def _scan(self) -> None:
        for path in self.root.glob("*/*.safetensors"):
            if path.name.startswith("."):
                continue  # a write that never finished
            entry = self._validated(path)
            if entry is None:
                self._counts["rejected"] += 1
                path.unlink(missing_ok=True)  # ignored and removed: never loaded later
                continue
            self._entries.setdefault(path.parent.name, []).append(entry)

    def _validated(self, path: Path) -> _DiskEntry | None:
        """The file's entry when its header, shapes and fingerprint check out; None otherwise."""
        from mlxrun import hub
        from mlxrun.errors import CorruptCheckpointError

        try:
            header = hub.checked_safetensors_header(path)  # bounded, offsets vs file size
            meta = header.pop("__metadata__", None) or {}
            if meta.get("format") != FORMAT:
                return None
            namespace = tuple(json.loads(meta["namespace"]))
            tokens = np.asarray(json.loads(meta["tokens"]), dtype=np.int64)
            layout = _layout(header)
            expected = _fingerprint(self._key, meta, layout)
            if not hmac.compare_digest(meta.get("fingerprint", ""), expected):
                return None
            if path.parent.name != _namespace_key(namespace) or not _shapes_ok(layout, tokens):
                return None
            st = path.stat()
        except (CorruptCheckpointError, OSError, KeyError, ValueError, TypeError):
            return None  # unreadable files are never fatal
        return _DiskEntry(path, tokens, st.st_size, st.st_mtime, layout)

    @property
    def total_bytes(self) -> int:
        return sum(e.size for es in self._entries.values() for e in es)

    def stats(self) -> dict:
        files = sum(len(es) for es in self._entries.values())
        return {**self._counts, "files": files, "bytes": self.total_bytes}

    def longest_prefix(self, namespace: tuple, token_ids: Sequence[int]) -> tuple[int, Any]:
        """(tokens matched, handle for `load`) over every file of the namespace."""
        tokens = np.asarray(token_ids, dtype=np.int64)
        best: tuple[int, Any] = (0, None)
        for entry in self._entries.get(_namespace_key(namespace), []):
            n = _common_prefix(entry.tokens, tokens)
            if n > best[0]:
                best = (n, entry)
        return best

    def load(self, handle: Any, num_tokens: int) -> KVBlock | None:
        """The first `num_tokens` of a file found by `longest_prefix`, as a stored block; None
        (and the file removed) when it changed since it was validated."""
        entry: _DiskEntry = handle
        again = self._validated(entry.path)
        if again is None or again.layout != entry.layout:
            self._counts["rejected"] += 1
            self._delete(entry.path.parent.name, entry)
            return None
        arrays = mx.load(str(entry.path))
        layers = [
            (arrays[f"{i}.keys"][:, :, :num_tokens], arrays[f"{i}.values"][:, :, :num_tokens])
            for i in range(len(arrays) // 2)
        ]
        block = KVBlock(layers, materialized=False).materialize()
        mx.eval([a for kv in block.layers for a in kv])
        entry.mtime = _touch(entry.path)  # recently used: last to go under the budget
        self._counts["hits"] += 1
        self._counts["hit_tokens"] += num_tokens
        return block

    # -- writes ------------------------------------------------------------------------------

    def save(self, namespace: tuple, token_ids: Sequence[int], blocks: Sequence[KVBlock]) -> bool:
        """Persist a token path's KV unless a file already covers it. Returns whether it wrote."""
        tokens = np.asarray(token_ids, dtype=np.int64)
        key = _namespace_key(namespace)
        entries = self._entries.setdefault(key, [])
        if any(_common_prefix(e.tokens, tokens) == len(tokens) for e in entries):
            return False
        block = concat_blocks(blocks)
        if block.nbytes > self.budget_bytes:
            return False
        arrays = {}
        for i, (k, v) in enumerate(block.layers):
            arrays[f"{i}.keys"], arrays[f"{i}.values"] = k, v
        metadata = {
            "format": FORMAT,
            "namespace": json.dumps(list(namespace), default=str),
            "tokens": json.dumps(tokens.tolist()),
        }
        layout = sorted(
            (n, _SAFETENSORS_DTYPE.get(a.dtype, str(a.dtype)), list(a.shape))
            for n, a in arrays.items()
        )
        metadata["fingerprint"] = _fingerprint(self._key, metadata, layout)
        folder = self.root / key
        _private_dir(folder)
        name = hashlib.sha1(tokens.tobytes()).hexdigest()[:24] + ".safetensors"
        tmp = folder / f".tmp-{uuid.uuid4().hex}.safetensors"
        try:
            with _private_file(tmp) as f:
                mx.save_safetensors(f, arrays, metadata=metadata)
            os.replace(tmp, folder / name)
        finally:
            tmp.unlink(missing_ok=True)
        mtime = _touch(folder / name)
        # Files holding a strict prefix of this path are now redundant.
        for old in [e for e in entries if _common_prefix(e.tokens, tokens) == len(e.tokens)]:
            self._delete(key, old)
        size = (folder / name).stat().st_size
        entries.append(_DiskEntry(folder / name, tokens, size, mtime, layout))
        self._counts["writes"] += 1
        self._enforce_budget()
        return True

    def _delete(self, key: str, entry: _DiskEntry) -> None:
        self._entries[key].remove(entry)
        entry.path.unlink(missing_ok=True)
        self._counts["deleted"] += 1

    def _enforce_budget(self) -> None:
        total = self.total_bytes
        by_age = sorted(
            ((e.mtime, k, e) for k, es in self._entries.items() for e in es), key=lambda t: t[0]
        )
        for _, key, entry in by_age:
            if total <= self.budget_bytes:
                break
            total -= entry.size
            self._delete(key, entry)

    def clear(self) -> None:
        for key, entries in list(self._entries.items()):
            for entry in list(entries):
                self._delete(key, entry)
