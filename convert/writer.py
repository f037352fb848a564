"""A streaming writer for sharded safetensors.

Every output tensor's name, dtype and shape are known before any data is computed (MLX is lazy), so
each shard's header is written first and tensors are appended one at a time: memory holds one tensor,
never a whole shard.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import mlx.core as mx

_CODES = {
    mx.bfloat16: "BF16", mx.float16: "F16", mx.float32: "F32", mx.float64: "F64",
    mx.uint8: "U8", mx.uint16: "U16", mx.uint32: "U32", mx.uint64: "U64",
    mx.int8: "I8", mx.int16: "I16", mx.int32: "I32", mx.int64: "I64", mx.bool_: "BOOL",
}  # fmt: skip

DEFAULT_MAX_SHARD_BYTES = 5 << 30  # as mlx-lm and the mlx-community models shard


def dtype_code(dtype: mx.Dtype) -> str:
    return _CODES[dtype]


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: mx.Dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.size
        for d in self.shape:
            n *= d
        return n


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


class ShardedWriter:
    """Write `entries` (in this order) into shards of at most `max_shard_bytes` each."""

    def __init__(
        self, out_dir: Path, entries: list[Entry], max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    ):
        self.out_dir = out_dir
        groups: list[list[Entry]] = []
        size = 0
        for e in entries:
            if not groups or (size + e.nbytes > max_shard_bytes and groups[-1]):
                groups.append([])
                size = 0
            groups[-1].append(e)
            size += e.nbytes
        names = shard_names(max(1, len(groups)))
        self._plan = list(zip(names, groups or [[]], strict=True))
        self._order = [e for _, g in self._plan for e in g]
        self._next = 0
        self._shard = -1
        self._file: BinaryIO | None = None
        self.weight_map = {e.name: name for name, g in self._plan for e in g}
        self.total_bytes = sum(e.nbytes for e in entries)

    def _open_next_shard(self) -> None:
        self._close_file()
        self._shard += 1
        name, group = self._plan[self._shard]
        header: dict = {"__metadata__": {"format": "mlx"}}
        offset = 0
        for e in group:
            header[e.name] = {
                "dtype": dtype_code(e.dtype),
                "shape": list(e.shape),
                "data_offsets": [offset, offset + e.nbytes],
            }
            offset += e.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
        self._file = open(self.out_dir / name, "wb")  # noqa: SIM115 - closed in _close_file
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)
        self._remaining = len(group)

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def write(self, name: str, array: mx.array) -> None:
        expect = self._order[self._next]
        if name != expect.name or array.dtype != expect.dtype or tuple(array.shape) != expect.shape:
            raise RuntimeError(f"writer expected {expect}, got {name} {array.dtype} {array.shape}")
        if self._file is None or self._remaining == 0:
            self._open_next_shard()
        assert self._file is not None
        # mx.array has the buffer protocol; its stub does not declare it.
        self._file.write(memoryview(mx.contiguous(array)))  # type: ignore[arg-type]
        self._remaining -= 1
        self._next += 1

    def close(self) -> None:
        """Finish; also writes empty leading shards' headers if nothing was planned."""
        if self._next != len(self._order):
            raise RuntimeError(f"writer closed after {self._next} of {len(self._order)} tensors")
        if self._shard < 0:
            self._open_next_shard()
        self._close_file()

    def abort(self) -> None:
        self._close_file()

    def index(self, total_parameters: int | None = None) -> dict:
        meta: dict = {"total_size": self.total_bytes}
        if total_parameters is not None:
            meta["total_parameters"] = total_parameters
        return {"metadata": meta, "weight_map": dict(sorted(self.weight_map.items()))}
