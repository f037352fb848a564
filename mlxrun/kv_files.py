"""One disk-tier segment file: a safetensors file written and read with numpy only.

The disk tier's writer and reader threads must not touch MLX (one thread owns it), so the engine
thread turns a segment's KV into numpy arrays (`block_arrays`) and back (`arrays_block`); this
module moves those arrays to and from disk. Arrays are stored by name (`<layer>.keys`,
`<layer>.values`; quantized KV adds `<layer>.keys.scales` / `.biases` beside the packed weights and
names its precision, e.g. "8:64", in the metadata's `kv_quant`), with the segment's metadata (format, fingerprint, namespace, parent key, token ids, a checksum of the data)
in the safetensors `__metadata__`. bfloat16 travels as uint16 bits (numpy has no bfloat16).

`read_segment` checks everything a torn or foreign file could get wrong (header, sizes, offsets,
shapes against the expected KV layout, format, fingerprint, checksum) and raises BadSegment.
Files are written to a temporary sibling (mode 0600) and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from mlxrun.kv_quant import KVQuant

FORMAT = "mlxrun-kv-2"
_MAX_HEADER = 1 << 24  # a header past 16 MiB is not ours

# safetensors dtype name <-> (mlx dtype name, numpy storage dtype)
_DTYPES = {
    "F32": ("float32", np.float32),
    "F16": ("float16", np.float16),
    "BF16": ("bfloat16", np.uint16),
    "U32": ("uint32", np.uint32),
    "I8": ("int8", np.int8),
    "U8": ("uint8", np.uint8),
}
_BY_MLX = {mlx_name: st for st, (mlx_name, _) in _DTYPES.items()}


class BadSegment(Exception):
    """A segment file that must not be loaded (torn, foreign, or for other weights)."""


# ------------------------------------------------------------------------- MLX side (engine thread)


_PARTS = ("", ".scales", ".biases")  # a quantized triple's names after the layer's own


def quant_text(quant: KVQuant | None) -> str:
    """A KVQuant as the metadata writes it ("bits:group"); "" for full precision."""
    return "" if quant is None else f"{quant.bits}:{quant.group_size}"


def parse_quant(text: str) -> KVQuant | None:
    """The inverse of `quant_text`."""
    if not text:
        return None
    from mlxrun.kv_quant import KVQuant

    bits, group = (int(x) for x in text.split(":"))
    return KVQuant(bits, group)


def block_arrays(block: Any) -> dict[str, tuple[str, np.ndarray]]:
    """A KVBlock's arrays by name as (safetensors dtype, numpy array). Evaluates the block."""
    import mlx.core as mx

    named = {}
    for i, layer in enumerate(block.layers):
        for kind, x in zip(("keys", "values"), layer, strict=True):
            parts = x if block.quant is not None else (x,)
            for suffix, a in zip(_PARTS, parts, strict=False):
                named[f"{i}.{kind}{suffix}"] = a
    mx.eval(list(named.values()))
    out = {}
    for name, a in named.items():
        st = _BY_MLX[str(a.dtype).removeprefix("mlx.core.")]
        storage = a.view(mx.uint16) if st == "BF16" else a
        out[name] = (st, np.array(storage, copy=True))
    return out


def arrays_block(arrays: dict[str, tuple[str, np.ndarray]], quant: KVQuant | None = None) -> Any:
    """The inverse of `block_arrays`: a stored (materialized) KVBlock at precision `quant`."""
    import mlx.core as mx

    from mlxrun.cache import KVBlock

    def to_mx(st: str, a: np.ndarray) -> mx.array:
        out = mx.array(a)
        return out.view(mx.bfloat16) if st == "BF16" else out

    def part(name: str) -> Any:
        if quant is None:
            return to_mx(*arrays[name])
        return tuple(to_mx(*arrays[name + suffix]) for suffix in _PARTS)

    n_layers = sum(1 for n in arrays if n.endswith(".keys"))
    layers = [(part(f"{i}.keys"), part(f"{i}.values")) for i in range(n_layers)]
    block = KVBlock(layers, quant=quant)
    mx.eval([a for kv in layers for x in kv for a in (x if quant is not None else (x,))])
    return block


def kv_layout(cache: Sequence[Any]) -> list[tuple[int, int, str]]:
    """(kv heads, head dim, safetensors dtype) per layer of a probed cache (>= 1 token)."""
    return [
        (int(c.keys.shape[1]), int(c.keys.shape[3]), _BY_MLX[str(c.keys.dtype).split(".")[-1]])
        for c in cache
    ]


def slice_tokens(arrays: dict, start: int, end: int) -> dict:
    """Tokens [start, end) of every array (axis 2: (1, n_kv_heads, L, head_dim))."""
    return {n: (st, a[:, :, start:end]) for n, (st, a) in arrays.items()}


# ------------------------------------------------------------------------- file I/O (any thread)


def _checksum(arrays: dict) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(arrays):
        h.update(np.ascontiguousarray(arrays[name][1]).data)
    return h.hexdigest()


def write_segment(path: Path, arrays: dict, meta: dict[str, str]) -> int:
    """Write a segment atomically (temporary sibling, 0600, rename). Returns its size."""
    header: dict[str, Any] = {}
    offset = 0
    for name in sorted(arrays):
        st, a = arrays[name]
        header[name] = {
            "dtype": st,
            "shape": list(a.shape),
            "data_offsets": [offset, offset + a.nbytes],
        }
        offset += a.nbytes
    header["__metadata__"] = {**meta, "format": FORMAT, "checksum": _checksum(arrays)}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for name in sorted(arrays):
                f.write(np.ascontiguousarray(arrays[name][1]).data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return 8 + len(raw) + offset


def read_header(path: Path) -> tuple[dict, int]:
    """(parsed header, data start). Raises BadSegment unless the header and sizes agree."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise BadSegment("truncated")
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER, size - 8):
                raise BadSegment("bad header length")
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise BadSegment(str(e)) from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict):
        raise BadSegment("no metadata")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = info["data_offsets"]
            _, storage = _DTYPES[info["dtype"]]
            count = int(np.prod(info["shape"]))
        except (KeyError, TypeError, ValueError) as e:
            raise BadSegment(f"bad entry {name}: {e}") from None
        if start != end or stop - start != count * np.dtype(storage).itemsize:
            raise BadSegment(f"bad offsets for {name}")
        end = stop
    if 8 + n + end != size:
        raise BadSegment("size does not match the header (torn write?)")
    return header, 8 + n


def check_layout(header: dict, layout: list[tuple[int, int, str]], length: int) -> None:
    """KV arrays for every layer, shaped as the model's are: (1, H, length, D) at full precision;
    packed uint32 weights (1, H, length, D*bits/32) and scales/biases (1, H, length, D/group)
    at the precision the metadata's `kv_quant` names."""
    try:
        quant = parse_quant(str(header["__metadata__"].get("kv_quant", "")))
    except ValueError:
        raise BadSegment("bad kv_quant") from None
    if quant is not None and (quant.bits not in (2, 3, 4, 5, 6, 8) or quant.group_size < 1):
        raise BadSegment("bad kv_quant")
    expected = {}
    for i, (h, d, st) in enumerate(layout):
        for kv in ("keys", "values"):
            if quant is None:
                expected[f"{i}.{kv}"] = ([1, h, length, d], st)
                continue
            groups = d // quant.group_size
            expected[f"{i}.{kv}"] = ([1, h, length, d * quant.bits // 32], "U32")
            expected[f"{i}.{kv}.scales"] = ([1, h, length, groups], st)
            expected[f"{i}.{kv}.biases"] = ([1, h, length, groups], st)
    if {n for n in header if n != "__metadata__"} != set(expected):
        raise BadSegment("arrays do not match the model's layers")
    for name, (shape, st) in expected.items():
        info = header[name]
        if info["shape"] != shape or info["dtype"] != st:
            raise BadSegment(f"{name}: shape {info['shape']} {info['dtype']}")


def read_segment(path: Path, header: dict, data_start: int) -> dict:
    """The arrays of a segment whose header was read; checks the checksum."""
    try:
        with open(path, "rb") as f:
            f.seek(data_start)
            data = f.read()
    except OSError as e:
        raise BadSegment(str(e)) from None
    arrays = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, stop = info["data_offsets"]
        storage = _DTYPES[info["dtype"]][1]
        a = np.frombuffer(data, dtype=storage, count=(stop - start) // np.dtype(storage).itemsize,
                          offset=start).reshape(info["shape"])  # fmt: skip
        arrays[name] = (info["dtype"], a)
    if _checksum(arrays) != header["__metadata__"].get("checksum"):
        raise BadSegment("checksum mismatch")
    return arrays
