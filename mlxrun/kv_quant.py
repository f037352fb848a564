"""Quantized KV inside the continuous batch.

mlx-lm has a quantized cache for one sequence (`QuantizedKVCache`) and a batch cache for full
precision (`BatchKVCache`), but no batch cache that is quantized. `BatchQuantizedKVCache` is that:
the same left-padded layout, prepare/finalize (right-padded prompt batches), filter, extend and
merge, with keys and values held as mlx's quantized triples (packed weights, scales, biases) of
shape (B, H, S, ·). mlx-lm's attention sees `bits` on the cache and runs
`quantized_scaled_dot_product_attention` on them, so every architecture whose attention goes
through mlx-lm's `scaled_dot_product_attention` gets it; the engine probes this at start.

Quantization is per token and per group of `group_size` channels of one head, so a token's
quantized KV does not depend on its batch row, its padding, or what else is in the batch: the
batch, the prefix cache and a request's own cache all hold the same bytes for it.

`KVQuant` names a precision (bits, group size); None everywhere means full precision.
`convert_batch` / `convert_cache` move a cache between precisions (the adaptive mode).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import mlx.core as mx
from mlx.utils import tree_map, tree_reduce
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import BatchKVCache, KVCache, QuantizedKVCache, _BaseCache, dynamic_roll

if TYPE_CHECKING:
    from mlxrun.models import ModelProtocol

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class KVQuant:
    bits: int = 8
    group_size: int = 64

    def quantize(self, x: mx.array) -> tuple[mx.array, ...]:
        return tuple(mx.quantize(x, group_size=self.group_size, bits=self.bits))

    def dequantize(self, q: tuple[mx.array, ...]) -> mx.array:
        w, scales, biases = q
        return mx.dequantize(w, scales, biases, group_size=self.group_size, bits=self.bits)


def quant_of(cache: Any) -> KVQuant | None:
    """The precision of a cache layer (per-request or batch): None for full precision."""
    bits = getattr(cache, "bits", None)
    return None if bits is None else KVQuant(int(bits), int(cache.group_size))


def make_quantized_cache(num_layers: int, quant: KVQuant) -> list:
    return [
        QuantizedKVCache(group_size=quant.group_size, bits=quant.bits) for _ in range(num_layers)
    ]


def _zeros_like_rows(q: tuple, rows: int, length: int) -> tuple:
    return tuple(mx.zeros((rows, x.shape[1], length, x.shape[3]), dtype=x.dtype) for x in q)


class BatchQuantizedKVCache(_BaseCache):
    """A left-padded batch of quantized KV: BatchKVCache's layout and bookkeeping (offset,
    left_padding, _idx), with keys and values as quantized triples."""

    step = 256

    def __init__(self, left_padding: list[int], bits: int = 8, group_size: int = 64):
        self.keys: tuple | None = None
        self.values: tuple | None = None
        self.bits, self.group_size = bits, group_size
        self.left_padding = mx.array(left_padding)
        self.offset = mx.array([-p for p in left_padding])
        self._idx = 0
        self._right_padding: mx.array | None = None

    @property
    def quant(self) -> KVQuant:
        return KVQuant(self.bits, self.group_size)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple:
        prev, n = self._idx, keys.shape[2]
        qk, qv = self.quant.quantize(keys), self.quant.quantize(values)
        if self.keys is None or prev + n > self.keys[0].shape[2]:
            grow = (self.step + n - 1) // self.step * self.step
            new_k, new_v = (_zeros_like_rows(q, keys.shape[0], grow) for q in (qk, qv))
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                self.keys, self.values = tree_map(
                    lambda old, new: mx.concatenate([old[..., :prev, :], new], axis=2),
                    (self.keys, self.values),
                    (new_k, new_v),
                )
        assert self.keys is not None and self.values is not None  # allocated above
        for i in range(3):
            self.keys[i][..., prev : prev + n, :] = qk[i]
            self.values[i][..., prev : prev + n, :] = qv[i]
        self.offset = self.offset + n
        self._idx += n
        return self.keys_and_values()

    def keys_and_values(self) -> tuple:
        return tree_map(lambda x: x[..., : self._idx, :], (self.keys, self.values))

    def prepare(self, *, left_padding=None, lengths=None, right_padding=None) -> None:
        # Borrowed: the padding bookkeeping is the same for quantized keys.
        BatchKVCache.prepare(self, left_padding=left_padding, right_padding=right_padding)  # type: ignore[arg-type]

    def finalize(self) -> None:
        if self._right_padding is not None:
            pad = self._right_padding
            self.keys, self.values = tree_map(
                lambda x: dynamic_roll(x, pad[:, None], axis=2), (self.keys, self.values)
            )
            self.offset = self.offset - pad
            self.left_padding += pad
            self._right_padding = None

    @property
    def state(self) -> tuple:
        return self.keys, self.values, self.offset, self.left_padding, self._idx

    @state.setter
    def state(self, v: tuple) -> None:
        self.keys, self.values, self.offset, self.left_padding, self._idx = v

    def make_mask(self, N: int, return_array: bool = False, **kwargs: Any) -> mx.array:
        return create_causal_mask(N, offset=self._idx, left_padding=self.left_padding, **kwargs)

    def filter(self, batch_indices: Any) -> None:
        idx = mx.array(batch_indices) if isinstance(batch_indices, list) else batch_indices
        if self.keys is not None:
            self.keys, self.values = tree_map(lambda x: x[idx], (self.keys, self.values))
        self.offset, self.left_padding = self.offset[idx], self.left_padding[idx]
        trim = min(cast("list[int]", self.left_padding.tolist()))  # drop padding every row now has
        if trim > 0:
            if self.keys is not None:
                self.keys, self.values = tree_map(
                    lambda x: x[..., trim:, :], (self.keys, self.values)
                )
            self._idx -= trim
            self.left_padding -= trim

    def extend(self, other: BatchQuantizedKVCache) -> None:
        if not isinstance(other, BatchQuantizedKVCache) or other.quant != self.quant:
            raise TypeError("a quantized batch extends only with the same precision")
        if self.keys is None and other.keys is None:
            self.left_padding = mx.concatenate([self.left_padding, other.left_padding])
            self.offset = mx.concatenate([self.offset, other.offset])
            return
        like = self.keys if self.keys is not None else other.keys
        like_v = self.values if self.values is not None else other.values
        idx = max(self._idx, other._idx)
        size = max(c.keys[0].shape[2] for c in (self, other) if c.keys is not None)

        assert like is not None and like_v is not None  # both empty returned above

        def right_justify(c: BatchQuantizedKVCache) -> tuple:
            rows = c.offset.shape[0]
            k = c.keys if c.keys is not None else _zeros_like_rows(like, rows, 0)
            v = c.values if c.values is not None else _zeros_like_rows(like_v, rows, 0)
            left = idx - c._idx
            right = size - k[0].shape[2] - left
            if right < 0:
                k, v = tree_map(lambda x: x[..., :right, :], (k, v))
                right = 0
            if left or right:
                k, v = tree_map(
                    lambda x: mx.pad(x, [(0, 0), (0, 0), (left, right), (0, 0)]), (k, v)
                )
            return k, v, c.offset, c.left_padding + left

        (k1, v1, o1, p1), (k2, v2, o2, p2) = right_justify(self), right_justify(other)
        cat = lambda a, b: mx.concatenate([a, b])  # noqa: E731
        self.keys, self.values = tree_map(cat, (k1, v1), (k2, v2))
        self.offset, self.left_padding = cat(o1, o2), cat(p1, p2)
        self._idx = idx

    @classmethod
    def merge(cls, caches: list) -> BatchQuantizedKVCache:
        """Per-request QuantizedKVCaches (of one precision) -> one left-padded batch."""
        quant = quant_of(caches[0])
        assert quant is not None and all(quant_of(c) == quant for c in caches)
        lengths = [c.offset if not c.empty() else 0 for c in caches]
        width = max(lengths)
        if width == 0:
            return cls([0] * len(caches), quant.bits, quant.group_size)
        pads = [width - n for n in lengths]
        like = next(c for c in caches if not c.empty())
        keys = _zeros_like_rows(like.keys, len(caches), width)
        values = _zeros_like_rows(like.values, len(caches), width)
        for i, (p, c) in enumerate(zip(pads, caches, strict=True)):
            if c.empty():
                continue
            for j in range(3):
                keys[j][i : i + 1, :, p:] = c.keys[j][..., : c.offset, :]
                values[j][i : i + 1, :, p:] = c.values[j][..., : c.offset, :]
        out = cls(pads, quant.bits, quant.group_size)
        out.keys, out.values = keys, values
        out.offset = out.offset + width
        out._idx = width
        return out

    def size(self) -> int:
        return self._idx

    def empty(self) -> bool:
        return self.keys is None

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return tree_reduce(lambda a, x: a + x.nbytes, (self.keys, self.values), 0)


def quant_aware(merge: Any) -> Any:
    """A batch merge that takes quantized per-request caches too (to BatchQuantizedKVCache)."""

    def merge_layer(layer: list) -> Any:
        if isinstance(layer[0], QuantizedKVCache):
            return BatchQuantizedKVCache.merge(layer)
        return merge(layer)

    return merge_layer


# ---------------------------------------------------------------------------- conversion


def convert_cache(cache: list, quant: KVQuant | None) -> list:
    """A request's own cache (KVCache or QuantizedKVCache layers) at another precision."""
    out = []
    for c in cache:
        have = quant_of(c)
        if have == quant:
            out.append(c)
            continue
        new = KVCache() if quant is None else QuantizedKVCache(quant.group_size, quant.bits)
        if not c.empty():
            k, v = c.keys_and_values()  # both kinds cut to the offset
            if have is not None:
                k, v = have.dequantize(k), have.dequantize(v)
            new.keys, new.values = (
                (k, v) if quant is None else (quant.quantize(k), quant.quantize(v))
            )
            new.offset = c.offset
        out.append(new)
    return out


def convert_batch(cache: Any, quant: KVQuant | None) -> Any:
    """One layer of the decode batch (BatchKVCache or BatchQuantizedKVCache) at another
    precision; padding and positions are kept."""
    have = quant_of(cache)
    if have == quant:
        return cache
    if quant is None:
        new: Any = BatchKVCache([0])
        assert have is not None  # have != quant
        if cache.keys is not None:
            k, v = cache.keys_and_values()
            new.keys, new.values = have.dequantize(k), have.dequantize(v)
    else:
        new = BatchQuantizedKVCache([0], quant.bits, quant.group_size)
        if cache.keys is not None:
            k, v = cache.keys_and_values()
            if have is not None:
                k, v = have.dequantize(k), have.dequantize(v)
            new.keys, new.values = quant.quantize(k), quant.quantize(v)
    new.offset, new.left_padding, new._idx = cache.offset, cache.left_padding, cache._idx
    return new


# ---------------------------------------------------------------------------- quality


def compare_to_full(
    model: ModelProtocol, prompt: list[int], num_tokens: int, quant: KVQuant
) -> tuple[float, float]:
    """Greedy decoding with full-precision KV vs `quant` KV, teacher-forced on the full path (a
    single disagreement must not derail every later comparison). Returns (share of steps whose
    top-1 token agrees, mean KL(full || quantized) in nats) over `num_tokens` steps."""
    from mlxrun import models

    full = models.make_cache(model)
    quantized = make_quantized_cache(len(full), quant)
    tokens = mx.array(prompt)[None]
    agree, kl = 0, 0.0
    for _ in range(num_tokens):
        lf = model(tokens, cache=full)[0, -1].astype(mx.float32)
        lq = model(tokens, cache=quantized)[0, -1].astype(mx.float32)
        pf, pq = (x - mx.logsumexp(x) for x in (lf, lq))
        step_kl = mx.sum(mx.exp(pf) * (pf - pq))
        best = mx.argmax(lf)
        same = best == mx.argmax(lq)
        mx.eval(step_kl, same)
        agree += int(same.item())  # type: ignore[arg-type]  # item() of a bool array
        kl += float(step_kl.item())  # type: ignore[arg-type]  # item() of a real array
        tokens = best.reshape(1, 1)
    return agree / num_tokens, kl / num_tokens
