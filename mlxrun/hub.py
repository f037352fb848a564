"""Where checkpoints come from: a local directory or a Hub repo id, resolved to a local path.

Downloads go through `huggingface_hub.snapshot_download`, which itself honours the HF cache
(HF_HOME / HF_HUB_CACHE), HF_HUB_OFFLINE and HF_ENDPOINT; nothing here re-reads those variables.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mlxrun.errors import (
    CorruptCheckpointError,
    InvalidRequestError,
    ModelNotFoundError,
    NotAModelError,
    OfflineError,
    RepoNotFoundError,
)

# Only what a runtime or converter reads: configs, safetensors, tokenizer files, chat templates.
# No *.py (no remote code), no *.bin / *.pth / *.gguf / onnx duplicates of the weights.
DEFAULT_ALLOW_PATTERNS = (
    "*.json",
    "*.safetensors",
    "*.model",
    "*.jinja",
    "*.txt",
    "*.tiktoken",
)
# Mistral-style repos ship the weights twice (consolidated.safetensors beside model-*.safetensors),
# and Llama repos keep a second copy of everything under original/.
DEFAULT_IGNORE_PATTERNS = ("*consolidated*.safetensors", "original/*")

# Hub rules: owner and name of 1-96 [\w.-], not starting or ending with '-' or '.', no '--' or '..'.
_REPO_PART = r"\w(?:[\w.-]{0,94}\w)?"
_REPO_ID_RE = re.compile(rf"{_REPO_PART}/{_REPO_PART}", re.ASCII)
MAX_HEADER_BYTES = 100 * 1024 * 1024
# safetensors dtype code -> bytes per element
DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip


def is_repo_id(s: str) -> bool:
    """True for `owner/name` strings that are not an existing local path."""
    if not _REPO_ID_RE.fullmatch(s) or "--" in s or ".." in s:
        return False
    return not Path(s).expanduser().exists()


def safetensors_header(file: str | Path) -> dict:
    """The JSON header of a safetensors file, read without touching the tensor data.

    Layout: 8 bytes little-endian u64 header length, then that many bytes of JSON.
    """
    file = Path(file)
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CorruptCheckpointError(f"{file} is truncated (no safetensors header)")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER_BYTES:
            raise CorruptCheckpointError(f"{file} has a bad safetensors header (length {n})")
        data = f.read(n)
    try:
        header = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CorruptCheckpointError(f"{file} has a corrupted safetensors header") from None
    if len(data) < n or not isinstance(header, dict):
        raise CorruptCheckpointError(f"{file} has a corrupted safetensors header")
    return header


def checked_safetensors_header(file: str | Path) -> dict:
    """The header, after checking every tensor's offsets against its shape and the file size, so
    a truncated or corrupted file fails before any tensor is read."""
    file = Path(file)
    header = safetensors_header(file)
    with open(file, "rb") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
    data_len = file.stat().st_size - 8 - header_len
    end = 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = (int(x) for x in meta["data_offsets"])
            numel = 1
            for d in meta["shape"]:
                numel *= int(d)
            expect = numel * DTYPE_BYTES[meta["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise CorruptCheckpointError(
                f"{file.name}: bad header entry for tensor {name!r}"
            ) from None
        if stop - begin != expect or begin < 0:
            raise CorruptCheckpointError(f"{file.name}: tensor {name!r} has inconsistent offsets")
        end = max(end, stop)
    if end > data_len:
        raise CorruptCheckpointError(
            f"{file.name} is truncated: {max(0, data_len)} data bytes, header needs {end}"
        )
    return header


def read_config(path: Path) -> dict:
    """config.json of a model directory; NotAModelError when missing or unreadable."""
    cfg = path / "config.json"
    if not cfg.is_file():
        raise NotAModelError(f"{path} has no config.json")
    try:
        config = json.loads(cfg.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NotAModelError(f"{cfg} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise NotAModelError(f"{cfg} does not hold a JSON object")
    return config


def is_mlx_model(path: str | Path) -> bool:
    """True when the directory already holds MLX weights (no conversion needed).

    Quantized MLX models carry a "quantization" section in config.json; unquantized ones are
    recognised by the `format: mlx` entry MLX writes into the safetensors metadata.
    """
    path = Path(path)
    try:
        config = read_config(path)
    except NotAModelError:
        return False
    if "quantization" in config:
        return True
    first = next(iter(sorted(path.glob("*.safetensors"))), None)
    if first is None:
        return False
    meta = safetensors_header(first).get("__metadata__") or {}
    return isinstance(meta, dict) and meta.get("format") == "mlx"


def check_model_dir(path: Path) -> Path:
    """A directory with config.json and safetensors weights, or NotAModelError."""
    read_config(path)
    if not any(path.glob("*.safetensors")):
        raise NotAModelError(
            f"{path} holds no *.safetensors weights",
            hint="Only safetensors checkpoints are supported; *.bin / *.pth / GGUF files are not read.",
        )
    return path


def resolve_source(
    source: str,
    *,
    revision: str | None = None,
    allow_patterns: Sequence[str] | None = None,
    progress: bool = True,
) -> Path:
    """A local model directory, or a Hub repo id downloaded (or found in the HF cache).

    With the default patterns the result is checked to hold config.json and safetensors; a
    caller passing its own `allow_patterns` (e.g. only config.json) checks what it asked for.
    """
    local = Path(source).expanduser()
    if local.exists():
        if not local.is_dir():
            raise NotAModelError(f"{source} is a file, not a model directory")
        path = local
    elif is_repo_id(source):
        path = _download(source, revision, allow_patterns, progress)
    else:
        raise ModelNotFoundError(f"no such directory: {source}")
    return check_model_dir(path) if allow_patterns is None else path


def _silent_tqdm() -> type:
    from huggingface_hub.utils import tqdm as hf_tqdm

    class SilentTqdm(hf_tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return SilentTqdm


def _download(
    repo_id: str, revision: str | None, allow_patterns: Sequence[str] | None, progress: bool
) -> Path:
    from huggingface_hub import snapshot_download

    patterns = list(allow_patterns) if allow_patterns is not None else list(DEFAULT_ALLOW_PATTERNS)
    kwargs: dict[str, Any] = {} if progress else {"tqdm_class": _silent_tqdm()}
    try:
        path = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=patterns,
            ignore_patterns=list(DEFAULT_IGNORE_PATTERNS),
            **kwargs,
        )
    except Exception as exc:  # noqa: BLE001 - translated into typed errors, else re-raised
        raise _translate(exc, repo_id, revision) from exc
    return Path(path)


def _network_errors() -> tuple[type[BaseException], ...]:
    # huggingface_hub 1.x+ speaks httpx; a transport error means the endpoint cannot be reached.
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for mod, name in (("httpx2", "TransportError"), ("httpx", "TransportError")):
        try:
            errors.append(getattr(__import__(mod), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _translate(exc: Exception, repo_id: str, revision: str | None) -> BaseException:
    """Map huggingface_hub's exceptions onto ours; anything unknown passes through unchanged."""
    return _answer_error(exc, repo_id, revision) or _offline_error(exc, repo_id) or exc


def _answer_error(exc: Exception, repo_id: str, revision: str | None) -> Exception | None:
    """The Hub answered, and said no."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    status = None
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
    if isinstance(exc, GatedRepoError):
        return RepoNotFoundError(
            f"{repo_id} is a gated repo and this account has no access to it",
            hint="Accept the licence on the model page, then run `hf auth login` "
            "(or set HF_TOKEN) and try again.",
        )
    if isinstance(exc, RepositoryNotFoundError) or status == 401:
        return RepoNotFoundError(f"repo {repo_id} not found on the Hub ({constants.ENDPOINT})")
    if isinstance(exc, RevisionNotFoundError):
        return InvalidRequestError(
            f"revision {revision!r} not found in {repo_id}",
            param="revision",
            hint="Pass an existing branch, tag or commit hash with --revision.",
        )
    if status is not None:
        return OfflineError(
            f"the Hub ({constants.ENDPOINT}) answered HTTP {status} while downloading {repo_id}",
            hint="Try again in a moment; if it persists, check HF_ENDPOINT and your token.",
        )
    return None


def _offline_error(exc: Exception, repo_id: str) -> Exception | None:
    """The Hub could not be asked (offline mode or no network) and the cache cannot answer."""
    from huggingface_hub import constants
    from huggingface_hub import errors as hf_errors

    offline_types = (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled)
    if not isinstance(exc, (*offline_types, *_network_errors())):
        return None
    if constants.HF_HUB_OFFLINE:
        why, hint = "HF_HUB_OFFLINE is set", "Unset HF_HUB_OFFLINE (or set it to 0) to download it."
    else:
        why = f"the Hub ({constants.ENDPOINT}) cannot be reached"
        hint = "Check the network connection (and HF_ENDPOINT if set), then try again."
    # Newer huggingface_hub tells a partial download (an interrupted pull) from no download.
    incomplete = getattr(hf_errors, "IncompleteSnapshotError", None)
    if incomplete is not None and isinstance(exc, incomplete):
        return OfflineError(f"the cached copy of {repo_id} is incomplete and {why}", hint=hint)
    return OfflineError(f"{repo_id} is not in the local Hugging Face cache and {why}", hint=hint)
