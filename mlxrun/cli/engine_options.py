"""What `generate`, `chat` and `serve` share about the engine: the prefix-cache tiers' flags, the
EngineConfig they make, and grammar flags (--json-schema, --grammar) for constrained decoding.

    @cache_options
    @grammar_options
    def cmd(..., cache_dir, cache_disk_size, json_schema, grammar): ...
        overrides = cache_overrides(None, cache_dir, cache_disk_size)
        constraint = read_constraint(tokenizer, json_schema, grammar)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from mlxrun.constrain import Constraint
    from mlxrun.tokenizer import Tokenizer


def parse_cache_bytes(text: str | None, flag: str = "--cache-memory") -> int | None:
    """A size flag's bytes (None: not given; 0 for 0/off/none); errors name the flag."""
    from mlxrun.errors import InvalidRequestError, parse_size

    if text is None:
        return None
    if text.strip().lower() in ("0", "off", "none"):
        return 0
    try:
        return parse_size(text)
    except InvalidRequestError as e:
        raise InvalidRequestError(
            f"{flag}: {e.message}",
            param=flag.lstrip("-").replace("-", "_"),
            hint="Write it like 2GB or 512MB.",
        ) from None


def disk_bytes(text: str | None, cache_dir: str | None) -> int | None:
    """--cache-disk-size, which means nothing without --cache-dir."""
    from mlxrun.errors import InvalidRequestError

    size = parse_cache_bytes(text, "--cache-disk-size")
    if size is not None and cache_dir is None:
        raise InvalidRequestError(
            "--cache-disk-size needs --cache-dir", param="cache_disk_size",
            hint="Add --cache-dir DIR (the disk tier is off without it).",
        )  # fmt: skip
    return size


def cache_overrides(
    cache_memory: str | None, cache_dir: str | None, cache_disk_size: str | None
) -> dict[str, Any]:
    """EngineConfig fields for the cache flags (checked before the model loads). 0 turns a
    tier off: --cache-memory 0 the memory tier, --cache-disk-size 0 the disk tier."""
    memory_bytes = parse_cache_bytes(cache_memory)
    disk = disk_bytes(cache_disk_size, cache_dir)
    out: dict[str, Any] = {"cache_dir": None if disk == 0 else cache_dir}
    if memory_bytes is not None:
        out["cache_memory_bytes"] = memory_bytes
    if disk:
        out["disk_cache_bytes"] = disk
    return out


def cache_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--cache-dir and --cache-disk-size (the prefix cache's disk tier), as `serve` has them."""
    fn = click.option("--cache-disk-size", default=None,
                      help="Byte budget of the disk tier, e.g. 20GB (default 8GB; LRU beyond it).",
                      )(fn)  # fmt: skip
    return click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
                        help="Keep the prefix cache's KV in this directory too, across runs "
                        "(off by default).")(fn)  # fmt: skip


def grammar_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--json-schema FILE and --grammar FILE: the output follows them (constrained decoding)."""
    fn = click.option("--grammar", type=click.Path(dir_okay=False), default=None,
                      help="A Lark or GBNF grammar file the output must follow.")(fn)  # fmt: skip
    return click.option("--json-schema", type=click.Path(dir_okay=False), default=None,
                        help="A JSON Schema file the output must validate against.")(fn)  # fmt: skip


def _read_text(path: str, flag: str) -> str:
    from mlxrun.errors import InvalidRequestError

    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
        raise InvalidRequestError(f"{flag} {path}: {why or e}", param=flag[2:]) from None


def read_constraint(
    tokenizer: Tokenizer, json_schema: str | None, grammar: str | None
) -> Constraint | None:
    """The Constraint the flags ask for (None: neither given); InvalidRequestError naming the
    flag for an unreadable file, bad JSON or a schema the grammar engine cannot enforce."""
    import json

    from mlxrun.constrain import GrammarCompiler
    from mlxrun.errors import InvalidRequestError

    if json_schema is not None and grammar is not None:
        raise InvalidRequestError("--json-schema and --grammar cannot be used together",
                                  param="grammar", hint="Pick one.")  # fmt: skip
    if json_schema is None and grammar is None:
        return None
    compiler = GrammarCompiler(tokenizer)
    if grammar is not None:
        return compiler.lark(_read_text(grammar, "--grammar"), param="grammar")
    assert json_schema is not None
    try:
        schema = json.loads(_read_text(json_schema, "--json-schema"))
    except json.JSONDecodeError as e:
        raise InvalidRequestError(f"--json-schema {json_schema}: invalid JSON ({e})",
                                  param="json_schema") from None  # fmt: skip
    return compiler.json_schema(schema, param="json_schema")
