"""The local model store: $MLXRUN_HOME/models/<name>, one MLX model directory per name.

Every directory is written elsewhere and renamed into place, so a name either holds a whole
model or does not exist. Hidden entries (leading dot) are staging or trash and never listed.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import math
import os
import re
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mlxrun import hub
from mlxrun.errors import (
    InvalidRequestError,
    MlxrunError,
    ModelNotFoundError,
    NotAModelError,
    OutputExistsError,
)

log = logging.getLogger(__name__)

METADATA_FILE = "mlxrun.json"
_CONTEXT_KEYS = (
    "max_position_embeddings",
    "max_sequence_length",
    "max_seq_len",
    "seq_length",
    "n_positions",
    "n_ctx",
)
_FLOAT_LABELS = {"BF16": "bf16", "F16": "f16", "F32": "f32", "F64": "f64"}
_BAD_NAME_CHARS = re.compile(r"[/\\\x00-\x1f:]")


def mlxrun_home() -> Path:
    home = os.environ.get("MLXRUN_HOME")
    return Path(home).expanduser() if home else Path.home() / ".mlxrun"


def models_dir() -> Path:
    return mlxrun_home() / "models"


def default_name(source: str) -> str:
    """Store name for a source: the repo name of `owner/name`, or the directory's name.

    An HF cache snapshot (…/models--owner--name/snapshots/<sha>) is named after its repo.
    """
    text = source.rstrip("/\\")
    if hub.is_repo_id(text):
        return text.split("/", 1)[1]
    path = Path(text).expanduser().resolve()
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.parent.parent.name.split("--")[-1]
    return path.name


def validate_name(name: str) -> str:
    """A store name is one plain path component: no separators, no leading dot, not empty."""
    if not name or not name.strip():
        raise InvalidRequestError("the model name is empty", param="name")
    if _BAD_NAME_CHARS.search(name) or name.startswith(".") or len(name) > 200:
        raise InvalidRequestError(
            f"invalid model name {name!r}",
            param="name",
            hint="Use letters, digits, '-', '_' and '.', without '/' or a leading dot.",
        )
    return name


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: Path
    architecture: str
    size_bytes: int  # all *.safetensors files on disk
    bits_per_weight: float
    context_length: int | None
    quantization: str  # "4-bit g64", "mixed_4_6", "mxfp4", "bf16"
    source: str | None  # where it was converted or pulled from (mlxrun.json)
    created: float  # seconds since the epoch

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        d["bits_per_weight"] = round(self.bits_per_weight, 4)
        d["created"] = datetime.fromtimestamp(self.created, timezone.utc).isoformat()
        return d


def _numel(shape: list[int]) -> int:
    return math.prod(int(d) for d in shape)


def _layer_bits(prefix: str, quant: dict, weight: dict, scales: dict) -> float:
    """Bits of one quantized layer: its per-layer override, the default, or read off the shapes."""
    override = quant.get(prefix)
    if isinstance(override, dict) and "bits" in override:
        return float(override["bits"])
    if "bits" in quant:
        return float(quant["bits"])
    group = quant.get("group_size", 64)
    in_features = scales["shape"][-1] * group
    return weight["shape"][-1] * 32 / in_features


def weight_stats(path: Path, config: dict) -> tuple[int, int, dict[str, int]]:
    """(stored bytes, logical weights, stored bytes per dtype) over all safetensors tensors.

    Bits per weight = stored bytes * 8 / logical weights, the figure mlx-lm reports:
    - a quantized layer `P` stores `P.weight` as uint32 words holding 32/bits values each, so it
      counts rows * packed_cols * 32 / bits logical weights; its `P.scales` / `P.biases` add bytes
      but no weights;
    - every other tensor counts all its elements, whatever its dtype.
    """
    quant = config.get("quantization") or {}
    tensors: dict[str, dict] = {}
    for file in sorted(path.glob("*.safetensors")):
        header = hub.safetensors_header(file)
        header.pop("__metadata__", None)
        tensors.update(header)
    quantized = {
        n[: -len(".weight")]
        for n in tensors
        if n.endswith(".weight") and f"{n[: -len('.weight')]}.scales" in tensors
    }
    stored = logical = 0
    by_dtype: dict[str, int] = {}
    for name, meta in tensors.items():
        begin, end = meta["data_offsets"]
        stored += end - begin
        by_dtype[meta["dtype"]] = by_dtype.get(meta["dtype"], 0) + end - begin
        prefix, _, leaf = name.rpartition(".")
        if prefix in quantized and leaf == "weight":
            bits = _layer_bits(prefix, quant, meta, tensors[f"{prefix}.scales"])
            logical += round(_numel(meta["shape"]) * 32 / bits)
        elif prefix in quantized and leaf in ("scales", "biases", "global_scale"):
            continue
        else:
            logical += _numel(meta["shape"])
    return stored, logical, by_dtype


def quantization_label(config: dict, by_dtype: dict[str, int], recipe: str | None = None) -> str:
    quant = config.get("quantization")
    if not isinstance(quant, dict):
        floats = {k: v for k, v in by_dtype.items() if k in _FLOAT_LABELS}
        if not floats:
            return "unknown"
        return _FLOAT_LABELS[max(floats, key=lambda k: floats[k])]
    mode = quant.get("mode", "affine")
    bits: set[Any] = {quant.get("bits")} | {
        v["bits"] for v in quant.values() if isinstance(v, dict) and "bits" in v
    }
    bits.discard(None)
    if len(bits) > 1:
        # The converter records its recipe label ("mixed_4_6 g64"); else name it by its bit widths.
        if recipe:
            return recipe
        return "mixed_" + "_".join(str(b) for b in sorted(bits)) + f" g{quant.get('group_size')}"
    if mode != "affine":
        return str(mode)
    return f"{quant.get('bits')}-bit g{quant.get('group_size')}"


def context_length(config: dict) -> int | None:
    for cfg in (config, config.get("text_config") or {}):
        for key in _CONTEXT_KEYS:
            value = cfg.get(key)
            if isinstance(value, int) and value > 0:
                return value
    return None


def read_metadata(path: Path) -> dict:
    """mlxrun.json written beside a converted or pulled model; {} when absent or unreadable."""
    try:
        data = json.loads((path / METADATA_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def read_quality(path: Path) -> dict | None:
    """The "quality" section of quality.json written by the converter; None when not measured."""
    try:
        data = json.loads((path / "quality.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    quality = data.get("quality") if isinstance(data, dict) else None
    return quality if isinstance(quality, dict) else None


def tensor_count(path: Path) -> int:
    """Tensors stored in the safetensors files (a quantized weight counts with its scales, biases)."""
    count = 0
    for file in path.glob("*.safetensors"):
        header = hub.safetensors_header(file)
        count += len(header) - ("__metadata__" in header)
    return count


def weight_bytes(path: Path) -> int:
    """Bytes of all *.safetensors files in a model directory."""
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def model_info(path: Path, name: str | None = None) -> ModelInfo:
    """Describe an MLX model directory from its config and safetensors headers only."""
    config = hub.read_config(path)
    hub.check_model_dir(path)
    meta = read_metadata(path)
    stored, logical, by_dtype = weight_stats(path, config)
    stamp = path / METADATA_FILE if (path / METADATA_FILE).exists() else path / "config.json"
    return ModelInfo(
        name=name or path.name,
        path=path,
        architecture=str(config.get("model_type", "unknown")),
        size_bytes=weight_bytes(path),
        bits_per_weight=stored * 8 / logical if logical else 0.0,
        context_length=context_length(config),
        quantization=quantization_label(config, by_dtype, meta.get("recipe")),
        source=meta.get("source"),
        created=stamp.stat().st_mtime,
    )


def _model_dirs() -> list[Path]:
    root = models_dir()
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def list_models() -> list[ModelInfo]:
    models = []
    for path in _model_dirs():
        try:
            models.append(model_info(path))
        except MlxrunError as exc:  # one broken directory must not hide the others
            log.warning("skipping %s: %s", path, exc.message)
    return models


def _not_found(name: str, message: str | None = None) -> ModelNotFoundError:
    """ModelNotFoundError whose hint names the closest store entry, if one is close enough."""
    message = message or f"no model named {name!r} in {models_dir()}"
    lowered = {p.name.lower(): p.name for p in _model_dirs()}
    close = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.6)
    if close:
        hint = f"Did you mean {lowered[close[0]]!r}? Run `mlxrun list` to see local models."
        return ModelNotFoundError(message, hint=hint)
    return ModelNotFoundError(message)


def model_path(name: str) -> Path:
    """Directory of a store model; ModelNotFoundError (with a suggestion) when there is none."""
    validate_name(name)
    path = models_dir() / name
    if not path.is_dir():
        raise _not_found(name)
    return path


def get_model(name: str) -> ModelInfo:
    return model_info(model_path(name), name)


def _discard(path: Path) -> None:
    """Remove a directory tree: renamed to a hidden sibling first, so it vanishes at once."""
    trash = path.with_name(f".{path.name}.trash-{uuid.uuid4().hex[:8]}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def remove_model(name: str) -> Path:
    path = model_path(name)
    _discard(path)
    return path


def resolve_model(name_or_path: str, *, revision: str | None = None, progress: bool = True) -> Path:
    """Store name first, then a local directory, then a Hub repo id (downloaded if needed)."""
    text = name_or_path
    with contextlib.suppress(InvalidRequestError):
        if (models_dir() / validate_name(text)).is_dir():
            return hub.check_model_dir(models_dir() / text)
    if Path(text).expanduser().exists() or hub.is_repo_id(text):
        return hub.resolve_source(text, revision=revision, progress=progress)
    raise _not_found(text, f"{text!r} is not a local model, a directory or a Hub repo id")


def staging_dir(name: str) -> Path:
    """A fresh hidden directory beside the store entry `name`, for building it before the rename."""
    validate_name(name)
    root = models_dir()
    root.mkdir(parents=True, exist_ok=True)
    path = root / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    return path


def check_free(name: str, *, force: bool = False) -> Path:
    """models/<name>, which must not exist yet unless force; OutputExistsError otherwise."""
    dest = models_dir() / validate_name(name)
    if dest.exists() and not force:
        raise OutputExistsError(
            f"a model named {name!r} already exists in {models_dir()}",
            hint=f"Pick another --name, pass --force, or run `mlxrun rm {name}` first.",
        )
    return dest


def commit_dir(built: Path, name: str, *, force: bool = False) -> Path:
    """Move a finished model directory to models/<name>; replaces an existing one only with force."""
    dest = check_free(name, force=force)
    if dest.exists():
        _discard(dest)
    os.replace(built, dest)
    return dest


def _link_or_copy(src: Path, dst: Path) -> None:
    # HF cache entries are symlinks to immutable blobs: a hard link shares the bytes for free.
    real = src.resolve()
    try:
        os.link(real, dst)
    except OSError:
        shutil.copyfile(real, dst)


def add_from_dir(src: Path, name: str, metadata: dict, *, force: bool = False) -> Path:
    """Install an MLX model directory (e.g. an HF cache snapshot) into the store as `name`."""
    if not hub.is_mlx_model(src):
        raise NotAModelError(f"{src} does not hold MLX weights")
    check_free(name, force=force)  # fail before copying gigabytes
    staging = staging_dir(name)
    try:
        for file in sorted(src.rglob("*")):
            if file.is_dir():
                continue
            target = staging / file.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            _link_or_copy(file, target)
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        meta = {**read_metadata(src), **metadata, "created": created}
        (staging / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return commit_dir(staging, name, force=force)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
