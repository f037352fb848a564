"""KV storage for the engine: KV blocks (the prefix cache's values), request caches built from
them, and rows cut out of the decode batch (the disk tier is mlxrun.disk_tier).

A `KVBlock` holds the keys and values of a run of tokens, per layer, each `(1, n_kv_heads, L,
head_dim)`. The radix index (mlxrun.prefix_cache) treats blocks as opaque and reaches them only
through `block_nbytes` and `split_block`.

Blocks cut from the decode batch start out lazy (slices of the whole batch buffer); they are
copied into buffers of their own before they are kept (`KVBlock.materialize`), or a kept block
would pin the batch's memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx


class KVBlock:
    """Keys and values of a run of tokens: `layers[i] = (keys, values)`, each (1, H, L, D)."""

    __slots__ = ("layers", "materialized")

    def __init__(self, layers: Sequence[tuple[mx.array, mx.array]], materialized: bool = True):
        self.layers = tuple((k, v) for k, v in layers)
        self.materialized = materialized

    @property
    def length(self) -> int:
        return int(self.layers[0][0].shape[2]) if self.layers else 0

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.layers)

    def materialize(self) -> KVBlock:
        """Copy into buffers of its own (asynchronously), releasing whatever it was sliced from."""
        if not self.materialized:
            self.layers = tuple((mx.contiguous(k), mx.contiguous(v)) for k, v in self.layers)
            mx.async_eval([a for kv in self.layers for a in kv])
            self.materialized = True
        return self

    def slice(self, start: int, end: int | None = None) -> KVBlock:
        """Tokens [start, end) as a lazy block (materialize it before keeping it)."""
        return KVBlock([(k[:, :, start:end], v[:, :, start:end]) for k, v in self.layers], False)


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
    if len(blocks) == 1:
        return blocks[0]
    layers = zip(*(b.layers for b in blocks), strict=True)
    return KVBlock(
        [
            (
                mx.concatenate([k for k, _ in kvs], axis=2),
                mx.concatenate([v for _, v in kvs], axis=2),
            )
            for kvs in layers
        ],
        materialized=False,
    )


def supports_prefix_cache(cache: Sequence[Any]) -> bool:
    """Plain KVCache layers only: their KV at a position depends on the tokens before it and
    nothing else, so it can be cut, stored and reused. Sliding windows and SSM states cannot."""
    from mlx_lm.models.cache import KVCache

    return all(type(c) is KVCache for c in cache)


def kv_bytes_per_token(cache: Sequence[Any]) -> int:
    """KV bytes one token takes across the layers of a cache that holds at least one token."""
    return sum(2 * c.keys[:, :, :1].nbytes for c in cache if getattr(c, "keys", None) is not None)


def cache_from_blocks(blocks: Sequence[KVBlock], fresh: list) -> list:
    """Fill `fresh` (a new per-request KVCache list) with the blocks' tokens, in order."""
    whole = concat_blocks(blocks)
    for c, (k, v) in zip(fresh, whole.layers, strict=True):
        c.keys, c.values = mx.contiguous(k), mx.contiguous(v)
        c.offset = int(k.shape[2])
    mx.eval([a for c in fresh for a in (c.keys, c.values)])
    return fresh


def block_from_cache(cache: Sequence[Any], num_tokens: int, row: int = 0) -> KVBlock | None:
    """The last `num_tokens` positions of batch row `row` as a lazy block. Works for a request's
    own KVCache list (row 0) and for the decode batch's BatchKVCache list, whose rows are
    left-padded: a row's tokens are always the last ones."""
    if num_tokens <= 0 or cache[0].empty():
        return None
    layers = []
    for c in cache:
        k, v = c.keys_and_values()  # (B, H, size, D)
        layers.append((k[row : row + 1, :, -num_tokens:], v[row : row + 1, :, -num_tokens:]))
    return KVBlock(layers, materialized=False)
