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
from typing import Any, cast

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map

from mlxrun.kv_quant import KVQuant, quant_of


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
    return [leaf for _, leaf in cast("list[tuple[str, mx.array]]", tree_flatten(list(layers)))]


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
