"""KV blocks (the prefix cache's values) and caches built from them (disk tier: test_disk_tier.py)."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.models.cache import BatchKVCache, KVCache

from mlxrun.cache import (
    KVBlock,
    block_from_cache,
    block_nbytes,
    cache_from_blocks,
    concat_blocks,
    split_block,
    supports_prefix_cache,
)
from mlxrun.prefix_cache import RadixCache

LAYERS, HEADS, DIM = 3, 2, 8


def _block(start: int, length: int, dtype=mx.float32) -> KVBlock:
    """Keys hold their position in the sequence (values its negative), so slices are checkable."""
    pos = mx.arange(start, start + length, dtype=dtype)[None, None, :, None]
    shape = (1, HEADS, length, DIM)
    layers = [
        (mx.broadcast_to(pos + 1000 * i, shape), mx.broadcast_to(-pos - 1000 * i, shape))
        for i in range(LAYERS)
    ]
    return KVBlock([(mx.array(k), mx.array(v)) for k, v in layers])


def _positions(block: KVBlock, layer: int = 0) -> list[float]:
    return block.layers[layer][0][0, 0, :, 0].tolist()


@pytest.mark.pure
def test_nbytes_counts_every_layer_keys_and_values():
    block = _block(0, 5)
    assert block.length == 5
    assert block_nbytes(block) == LAYERS * 2 * HEADS * 5 * DIM * 4
    assert _block(0, 5, mx.bfloat16).nbytes == block.nbytes // 2


@pytest.mark.pure
def test_split_then_concat_is_the_identity():
    block = _block(10, 7)
    first, rest = split_block(block, 3)
    assert (first.length, rest.length) == (3, 4)
    assert _positions(first) == [10, 11, 12]
    assert _positions(rest, layer=2) == [2013, 2014, 2015, 2016]
    assert first.materialized and rest.materialized
    whole = concat_blocks([first, rest])
    for (k, v), (k0, v0) in zip(whole.layers, block.layers, strict=True):
        assert mx.array_equal(k, k0) and mx.array_equal(v, v0)
    assert whole.nbytes == block.nbytes


@pytest.mark.pure
def test_split_of_a_lazy_block_keeps_only_the_rest_and_frees_the_source():
    mx.synchronize()
    base = mx.get_active_memory()
    big = mx.zeros((1, HEADS, 4096, 64))
    mx.eval(big)
    lazy = KVBlock([(big, big)], materialized=False).slice(0, 4096)
    first, rest = split_block(lazy, 4000)
    assert not first.materialized and rest.materialized
    del big, lazy, first
    mx.eval(rest.layers[0])
    held = mx.get_active_memory() - base
    # Only the 96-token tail (twice: keys and values) stays, not the 4,096-token source.
    assert held <= 2 * rest.layers[0][0].nbytes + 64 * 1024


@pytest.mark.pure
def test_radix_cache_stores_blocks_and_returns_them_in_order():
    radix = RadixCache(1 << 20, nbytes=block_nbytes, split=split_block)
    tokens = list(range(100, 120))
    assert radix.insert(("m",), tokens, _block(0, 20)) == 20
    assert radix.insert(("m",), tokens[:12] + [7, 8], _block(0, 14)) == 2  # shares 12
    match = radix.match_prefix(("m",), tokens[:15] + [1])
    assert match.length == 15
    assert _positions(concat_blocks(match.values)) == list(range(15))
    assert radix.total_bytes == _block(0, 22).nbytes


def _prefill(model, ids):
    cache = [KVCache() for _ in model.layers]
    logits = model(mx.array(ids)[None], cache=cache)
    return cache, logits


@pytest.fixture(scope="module")
def tiny(checkpoint_factory):
    from mlxrun.loader import load

    model, _, _ = load(str(checkpoint_factory("llama")))
    return model


@pytest.mark.model
def test_a_cache_built_from_segments_continues_like_the_original(tiny):
    ids = [5, 17, 99, 3, 42, 8, 61, 7, 23, 11]
    cache, _ = _prefill(tiny, ids[:-1])
    assert supports_prefix_cache(cache)
    whole = block_from_cache(cache, len(ids) - 1)
    assert whole is not None and whole.length == 9
    a, b = split_block(whole, 4)
    b1, b2 = split_block(b, 2)
    rebuilt = cache_from_blocks([a, b1, b2], [KVCache() for _ in tiny.layers])
    assert rebuilt[0].offset == 9
    expected = tiny(mx.array(ids[-1:])[None], cache=cache)
    got = tiny(mx.array(ids[-1:])[None], cache=rebuilt)
    assert mx.allclose(got, expected, atol=1e-5).item()
    _, full = _prefill(tiny, ids)
    assert mx.allclose(got[:, -1], full[:, -1], atol=1e-4).item()


@pytest.mark.model
def test_block_from_a_batch_row_skips_the_left_padding(tiny):
    short, long = [4, 5, 6], [9, 8, 7, 6, 5, 4, 3]
    c_short, _ = _prefill(tiny, short)
    c_long, _ = _prefill(tiny, long)
    batch = [BatchKVCache.merge([s, lg]) for s, lg in zip(c_short, c_long, strict=True)]
    row = block_from_cache(batch, len(short), row=0)
    alone = block_from_cache(c_short, len(short))
    assert row is not None and alone is not None
    for (k, v), (k0, v0) in zip(row.layers, alone.layers, strict=True):
        assert mx.array_equal(k, k0) and mx.array_equal(v, v0)
    assert block_from_cache(batch, len(long), row=1).length == len(long)
