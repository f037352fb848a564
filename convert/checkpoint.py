"""Reading a source checkpoint without loading it: config, index and safetensors headers.

Every shard's header is parsed and checked against the file size up front, so a truncated or corrupted
download fails before any output is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from mlxrun.errors import CorruptCheckpointError, NotAModelError
from mlxrun.hfconfig import normalize
from mlxrun.hub import checked_safetensors_header, read_config
from mlxrun.models import build_model, model_classes, supported_model_types  # noqa: F401
from mlxrun.safety import check_config


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


def load_config(path: Path) -> dict:
    config = read_config(path)
    if "model_type" not in config:
        raise NotAModelError(f"{path / 'config.json'} has no model_type")
    check_config(config, str(path / "config.json"))  # before any size plans or allocates memory
    # With the legacy keys filled in, the converted config.json reads right in plain mlx-lm too.
    return normalize(config)


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
        for name, meta in checked_safetensors_header(file).items():
            if name == "__metadata__":
                continue
            shape = tuple(int(d) for d in meta["shape"])
            begin, stop = meta["data_offsets"]
            ckpt.tensors[name] = TensorInfo(name, meta["dtype"], shape, stop - begin, file)
    return ckpt
