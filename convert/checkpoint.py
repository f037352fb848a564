"""Reading a source checkpoint without loading it: config, index and safetensors headers.

Every shard's header is parsed and checked against the file size up front, so a truncated or corrupted
download fails before any output is written.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from mlxrun.errors import CorruptCheckpointError, NotAModelError
from mlxrun.models import build_model, model_classes, supported_model_types  # noqa: F401

# safetensors dtype code -> bytes per element
DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    file: Path


@dataclass
class SourceCheckpoint:
    path: Path
    config: dict
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    shard_files: list[Path] = field(default_factory=list)

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", ""))

    @property
    def largest_shard_bytes(self) -> int:
        return max((f.stat().st_size for f in self.shard_files), default=0)

    @property
    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.shard_files)

    @property
    def is_mlx(self) -> bool:
        return "quantization" in self.config


def read_header(file: Path) -> dict:
    """Parse and validate one safetensors header; raises CorruptCheckpointError."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CorruptCheckpointError(f"{file.name} is truncated ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise CorruptCheckpointError(f"{file.name} has a bad safetensors header (length {n})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CorruptCheckpointError(
                f"{file.name} has a corrupted safetensors header"
            ) from None
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{file.name} has a corrupted safetensors header")
    data_len = size - 8 - n
    end = 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = meta["data_offsets"]
            numel = 1
            for d in meta["shape"]:
                numel *= int(d)
            expect = numel * DTYPE_BYTES[meta["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise CorruptCheckpointError(f"{file.name}: bad entry for tensor {name!r}") from None
        if stop - begin != expect or begin < 0:
            raise CorruptCheckpointError(f"{file.name}: tensor {name!r} has inconsistent offsets")
        end = max(end, stop)
    if end > data_len:
        raise CorruptCheckpointError(
            f"{file.name} is truncated: {data_len} data bytes, header needs {end}"
        )
    return header


def load_config(path: Path) -> dict:
    cfg = path / "config.json"
    if not cfg.is_file():
        raise NotAModelError(f"{path} has no config.json")
    try:
        config = json.loads(cfg.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NotAModelError(f"{cfg} is not valid JSON: {e}") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise NotAModelError(f"{cfg} has no model_type")
    return config


def _shard_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (KeyError, TypeError, json.JSONDecodeError):
            raise CorruptCheckpointError(f"{index.name} is not a valid index") from None
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise CorruptCheckpointError(
                f"shard {missing[0]} named in {index.name} is missing"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
                hint="The download is incomplete: run the command again to fetch the missing files.",
            )
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise NotAModelError(f"{path} holds no *.safetensors weights")
    return files


def open_checkpoint(path: str | Path) -> SourceCheckpoint:
    """Describe a local checkpoint directory; validates everything that can be checked cheaply."""
    path = Path(path)
    if not path.is_dir():
        raise NotAModelError(f"{path} is not a directory")
    config = load_config(path)
    ckpt = SourceCheckpoint(path=path, config=config, shard_files=_shard_files(path))
    for file in ckpt.shard_files:
        for name, meta in read_header(file).items():
            if name == "__metadata__":
                continue
            shape = tuple(int(d) for d in meta["shape"])
            begin, stop = meta["data_offsets"]
            ckpt.tensors[name] = TensorInfo(name, meta["dtype"], shape, stop - begin, file)
    return ckpt
