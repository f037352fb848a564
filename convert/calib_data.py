"""Calibration text for the calibrated methods: the built-in code corpus, or `--calib FILE|DIR`.

The built-in set (convert/corpus/) is our own small mix of code in several languages plus chat turns,
so a code model is calibrated on what it will be asked for. It never overlaps the quality check's
held-out text (convert/calib.py), which is what the reported KL and perplexity are measured on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from mlxrun.errors import InvalidRequestError

CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
BUILTIN_LABEL = "built-in code corpus"
DEFAULT_SAMPLES = 32  # sequences
DEFAULT_SEQ_LEN = 256  # tokens each
MIN_TOKENS = 32  # fewer and no statistic (a Hessian, an activation scale) means anything
_TEXT_SUFFIXES = {"", ".txt", ".md", ".py", ".js", ".ts", ".rs", ".go", ".c", ".h", ".java",
                  ".sh", ".sql", ".rb", ".cpp", ".json", ".jsonl", ".toml", ".yaml", ".yml"}  # fmt: skip


@dataclass(frozen=True)
class CalibSet:
    label: str  # what the model card names: the built-in corpus or the --calib path
    documents: tuple[str, ...]


def read_text_file(path: Path) -> str:
    """A calibration text file's text; unreadable, non-UTF-8 or binary files are typed errors."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequestError(
            f"calibration file {path} is not UTF-8 text", param="calib"
        ) from None
    except OSError as e:
        raise InvalidRequestError(
            f"cannot read calibration file {path}: {e}", param="calib"
        ) from None
    if "\x00" in text:
        raise InvalidRequestError(f"calibration file {path} is binary, not text", param="calib")
    return text


def _dir_files(path: Path) -> list[Path]:
    files = [p for p in sorted(path.rglob("*")) if p.is_file() and p.suffix in _TEXT_SUFFIXES]
    return [p for p in files if not any(part.startswith(".") for part in p.relative_to(path).parts)]


def read_calib_set(path: str | Path | None) -> CalibSet:
    """The built-in corpus (None), one text file, or every text file under a directory."""
    if path is None:
        files, label = sorted(CORPUS_DIR.glob("*.txt")), BUILTIN_LABEL
    else:
        p = Path(path).expanduser()
        if not p.exists():
            raise InvalidRequestError(f"calibration data {path} does not exist", param="calib")
        files, label = (_dir_files(p) if p.is_dir() else [p]), str(path)
    docs = tuple(t for t in (read_text_file(f) for f in files) if t.strip())
    if not docs:
        raise InvalidRequestError(f"calibration data {path} holds no text", param="calib")
    return CalibSet(label, docs)


def calib_tokens(
    tokenizer, calib: CalibSet, samples: int = DEFAULT_SAMPLES, seq_len: int = DEFAULT_SEQ_LEN
) -> mx.array:
    """(N, seq_len) int32: documents joined by EOS and cut into consecutive chunks.

    The chunks are taken in order (no random sampling), so a conversion is reproducible; with
    less text than `samples` full chunks there are fewer rows, and text shorter than one chunk
    becomes one shorter row.
    """
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in calib.documents:
        # verbose=False: a document longer than the model's context is fine, it is cut below.
        ids.extend(tokenizer.encode(doc, add_special_tokens=False, verbose=False))
        if eos is not None:
            ids.append(int(eos))
    if len(ids) < MIN_TOKENS:
        raise InvalidRequestError(
            f"calibration data {calib.label} is only {len(ids)} token(s); calibration needs at "
            f"least {MIN_TOKENS}",
            param="calib",
            hint="Use more text, or drop --calib for the built-in code corpus.",
        )
    seq_len = min(seq_len, len(ids))
    rows = max(1, min(samples, len(ids) // seq_len))
    return mx.array(ids[: rows * seq_len], dtype=mx.int32).reshape(rows, seq_len)
