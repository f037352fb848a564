"""The engine's KV precision: full, fixed 8/4-bit, or adaptive ("auto").

    kv = KVPrecision(config.kv_bits, config.kv_group_size)   # checks the values
    merge = kv.setup(model, probe_cache, merge)               # probes the model, per-token bytes
    kv.set_capacity(tokens)                                   # the KV budget, in smallest-KV tokens
    kv.adapt(reserved, batch, prefilling)                     # each schedule: switch if needed
    seq.cache = kv.make_cache(model)

Adaptive mode converts the whole batch at a threshold. Per-row precision inside one batch is
not possible with one attention call (mlx's quantized matmul takes one precision for the whole
KV tensor), and two batches (full and 8-bit) stepped side by side would read every weight twice
per step exactly when the server is busiest: decode is bandwidth-bound, so that halves
throughput. Converting the batch instead keeps one forward pass per step, and it frees memory
at once (the rows already running shrink too), where quantizing only new rows frees nothing
until they arrive. So: while the KV reserved by admitted requests fits the budget at full
precision, KV stays full; when an admission would pass it, the batch and every prefilling cache
move to 8-bit before the new request's KV exists, and the scheduler's capacity (counted at
8-bit) refuses only past what 8-bit holds. When the load falls to 3/4 of the full-precision
capacity (a margin, so a load hovering at the threshold does not convert every step), the
batch moves back to full precision (tokens already quantized stay approximate; new ones are
exact).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import mlx.core as mx

from mlxrun import models
from mlxrun.batch import BATCH_TOLERANCE, _batched_error
from mlxrun.cache import kv_bytes_per_token
from mlxrun.errors import InvalidRequestError
from mlxrun.kv_quant import (
    BITS,
    GROUP_SIZES,
    BatchQuantizedKVCache,
    KVQuant,
    convert_batch,
    convert_cache,
    make_quantized_cache,
    quant_aware,
    quant_of,
)

if TYPE_CHECKING:
    from mlxrun.batch import DecodeBatch
    from mlxrun.models import ModelProtocol

logger = logging.getLogger(__name__)

AUTO_BITS = 8  # what "auto" moves to under pressure


def parse_kv_bits(value: Any) -> int | str | None:
    """'8' / 8 / '4' / 'auto' / None / 'none' / 16 (full) -> 8, 4, 'auto' or None."""
    text = str(value).strip().lower() if value is not None else "none"
    if text in ("none", "off", "16", "full"):
        return None
    if text == "auto":
        return "auto"
    if text.isdigit() and int(text) in BITS:
        return int(text)
    raise InvalidRequestError(
        f"kv_bits must be 8, 4 or auto (16 or none for full precision), got {value!r}",
        param="kv_bits",
    )


class KVPrecision:
    def __init__(self, bits: Any, group_size: int = 64):
        self.mode = parse_kv_bits(bits)
        if group_size not in GROUP_SIZES:
            raise InvalidRequestError(
                f"kv_group_size must be one of {GROUP_SIZES}, got {group_size!r}",
                param="kv_group_size",
            )
        self.group_size = group_size
        self.quant: KVQuant | None = (
            KVQuant(self.mode, group_size) if isinstance(self.mode, int) else None
        )
        self.full_per_token = self.smallest_per_token = 0
        self.full_bits = 16
        self.full_capacity: int | None = None  # auto: tokens the budget holds at full precision
        self.switches = 0
        self.stats: dict = {}

    @property
    def _target(self) -> KVQuant | None:
        """The smallest precision this mode uses."""
        if self.mode == "auto":
            return KVQuant(AUTO_BITS, self.group_size)
        return self.quant

    def setup(self, model: ModelProtocol, cache: list, merge: Any) -> Any:
        """Measure per-token bytes on `cache` (holding one token) and check the model runs
        quantized batches; returns the batch merge to use. Falls back to full precision, with
        a warning, for models whose caches or attention cannot take quantized KV."""
        self.full_per_token = self.smallest_per_token = kv_bytes_per_token(cache)
        keys = getattr(cache[0], "keys", None)
        if keys is not None:
            self.full_bits = keys.dtype.size * 8
        target = self._target
        if target is None:
            self._publish(0, [])
            return merge
        reason = self._unsupported(model, cache, merge, target)
        if reason:
            logger.warning("KV quantization is off for this model: %s", reason)
            self.mode, self.quant = None, None
            self._publish(0, [])
            return merge
        probe = make_quantized_cache(len(cache), target)
        mx.eval(model(mx.array([[0]]), cache=probe), [c.state for c in probe])
        self.smallest_per_token = kv_bytes_per_token(probe)
        self._publish(0, [])
        return quant_aware(merge)

    @staticmethod
    def _unsupported(model: ModelProtocol, cache: list, merge: Any, quant: KVQuant) -> str | None:
        from mlx_lm.models.cache import KVCache

        if not all(type(c) is KVCache for c in cache):
            return "its layers are not all plain KV caches (sliding windows, SSM states)"
        if merge is None:
            return "it cannot decode batched"
        try:
            err = _batched_error(
                model, lambda: make_quantized_cache(len(cache), quant), BatchQuantizedKVCache.merge
            )
        except (ValueError, RuntimeError, TypeError, AttributeError) as e:
            return f"its attention does not take quantized KV ({e})"
        if err > BATCH_TOLERANCE:
            return f"batched quantized decode disagrees with one at a time (error {err:.3g})"
        return None

    def set_capacity(self, capacity: int | None) -> None:
        """`capacity`: KV tokens the budget holds at the smallest precision in use."""
        if capacity is not None and self.smallest_per_token:
            self.full_capacity = capacity * self.smallest_per_token // self.full_per_token

    def make_cache(self, model: ModelProtocol) -> list:
        if self.quant is None:
            return models.make_cache(model)
        return make_quantized_cache(len(models.make_cache(model)), self.quant)

    def adapt(self, reserved: int, batch: DecodeBatch, prefilling: list[Any]) -> None:
        """Auto mode: move the batch and prefilling caches to 8-bit when the reserved KV passes
        what fits at full precision; back to full when it falls to 3/4 of that."""
        if self.mode != "auto" or self.full_capacity is None:
            return
        if self.quant is None and reserved > self.full_capacity:
            self._switch(KVQuant(AUTO_BITS, self.group_size), batch, prefilling)
        elif self.quant is not None and reserved <= self.full_capacity * 3 // 4:
            self._switch(None, batch, prefilling)

    def _switch(self, quant: KVQuant | None, batch: DecodeBatch, prefilling: list[Any]) -> None:
        logger.info("KV precision: %s -> %s", self.quant, quant)
        self.quant = quant
        self.switches += 1
        if batch.caches is not None:
            batch.caches = [convert_batch(c, quant) for c in batch.caches]
        for seq in prefilling:
            seq.cache = convert_cache(seq.cache, quant)
        arrays = [c.state for c in batch.caches or []] + [
            c.state for s in prefilling for c in s.cache
        ]
        mx.eval(arrays)  # the old buffers go now, not whenever the next step runs

    def publish(self, batch_rows: int, prefilling: list) -> None:
        self._publish(batch_rows, prefilling)

    def _publish(self, batch_rows: int, prefilling: list) -> None:
        """A snapshot for stats() (read on other threads): sequences by the precision of their
        KV now, the precision new KV gets, bytes per token."""
        counts = {"full": 0, 8: 0, 4: 0}
        counts["full" if self.quant is None else self.quant.bits] += batch_rows
        for seq in prefilling:
            q = quant_of(seq.cache[0])
            counts["full" if q is None else q.bits] += 1
        per_token = self.full_per_token if self.quant is None else self.smallest_per_token
        self.stats = {
            "kv_bits": self.mode if self.mode is not None else self.full_bits,
            "kv_bits_now": self.full_bits if self.quant is None else self.quant.bits,
            "kv_bytes_per_token": per_token,
            "kv_sequences_full": counts["full"],
            "kv_sequences_8bit": counts[8],
            "kv_sequences_4bit": counts[4],
            "kv_precision_switches": self.switches,
        }
