"""Per-model settings without restart flags: $MLXRUN_HOME/models.toml.

    [models."qwen2.5-coder-7b"]
    alias = ["coder", "gpt-4o-mini"]    # more names clients may send ("claude-*" patterns too)
    context = 8192                      # context length to serve it with
    draft = "qwen2.5-coder-0.5b"        # a draft model for speculative decoding
    keep_alive = "30m"                  # idle time before unload (-1: never, 0: at once)

    [models."qwen2.5-coder-7b".sampling]
    temperature = 0.2
    top_p = 0.9

The file is read when a command starts (`mlxrun serve`, `show`, `run`); a mistake in it is a
one-line error naming the file and the key.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlxrun.errors import InvalidRequestError
from mlxrun.governor import parse_keep_alive

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 reads TOML with the tomli backport
    import tomli as tomllib

FILE_NAME = "models.toml"
# Default sampling a model may set: SamplingParams fields a request may also send.
SAMPLING_KEYS = {"temperature": float, "top_p": float, "top_k": int, "min_p": float,
                 "repetition_penalty": float, "presence_penalty": float,
                 "frequency_penalty": float, "max_tokens": int, "seed": int}  # fmt: skip
_KEYS = {"alias", "aliases", "context", "draft", "keep_alive", "sampling"}


@dataclass(frozen=True)
class ModelSettings:
    aliases: tuple[str, ...] = ()
    context: int | None = None
    draft: str | None = None
    keep_alive_s: float | None = None  # None: the server's --keep-alive
    keep_alive: str | None = None  # as written, for `mlxrun show`
    sampling: dict[str, Any] = field(default_factory=dict, hash=False)


def settings_path() -> Path:
    from mlxrun.store import mlxrun_home

    return mlxrun_home() / FILE_NAME


def load_settings(path: Path | None = None) -> dict[str, ModelSettings]:
    """Every model's settings by store name; {} when the file does not exist."""
    path = path or settings_path()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise InvalidRequestError(f"cannot read {path}: {e}", param=FILE_NAME,
                                  hint=f"Fix or remove {path}.") from None  # fmt: skip
    models = raw.get("models", {})
    if not isinstance(models, dict):
        raise _bad(path, "models", "a table of [models.NAME] tables")
    return {name: _one(path, name, table) for name, table in models.items()}


def _bad(path: Path, key: str, wanted: str) -> InvalidRequestError:
    return InvalidRequestError(f"{path}: {key} must be {wanted}", param=FILE_NAME,
                               hint=f"Fix {key} in {path}.")  # fmt: skip


def _one(path: Path, name: str, table: Any) -> ModelSettings:
    where = f"models.{name!r}"
    if not isinstance(table, dict):
        raise _bad(path, where, "a table")
    unknown = sorted(set(table) - _KEYS)
    if unknown:
        raise _bad(path, f"{where}.{unknown[0]}", f"one of {', '.join(sorted(_KEYS))}")
    aliases = table.get("alias", table.get("aliases", ()))
    if isinstance(aliases, str):
        aliases = (aliases,)
    if not isinstance(aliases, (list, tuple)) or not all(isinstance(a, str) for a in aliases):
        raise _bad(path, f"{where}.alias", "a name or a list of names")
    context = table.get("context")
    if context is not None and (not isinstance(context, int) or isinstance(context, bool)
                                or context < 1):  # fmt: skip
        raise _bad(path, f"{where}.context", "a positive whole number of tokens")
    draft = table.get("draft")
    if draft is not None and not isinstance(draft, str):
        raise _bad(path, f"{where}.draft", "a model name")
    keep = table.get("keep_alive")
    try:
        keep_s = None if keep is None else parse_keep_alive(keep)
    except InvalidRequestError:
        raise _bad(path, f"{where}.keep_alive", 'a duration like "5m", 0 or -1') from None
    return ModelSettings(tuple(aliases), context, draft, keep_s,
                         None if keep is None else str(keep), _sampling(path, where, table))  # fmt: skip


def _sampling(path: Path, where: str, table: dict) -> dict[str, Any]:
    sampling = table.get("sampling", {})
    if not isinstance(sampling, dict):
        raise _bad(path, f"{where}.sampling", "a table")
    out: dict[str, Any] = {}
    for key, value in sampling.items():
        kind = SAMPLING_KEYS.get(key)
        if kind is None:
            raise _bad(path, f"{where}.sampling.{key}", f"one of {', '.join(SAMPLING_KEYS)}")
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or (kind is int and not isinstance(value, int))
        ):
            raise _bad(path, f"{where}.sampling.{key}", "a number")
        out[key] = kind(value)
    return out
