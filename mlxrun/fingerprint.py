"""A model directory's fingerprint, from its files alone (no MLX, no tensor decoding).

`mlxrun launch` compares it across hosts before starting a distributed run: each host reads the
weights from its own disk, and ranks holding different files would compute garbage together
without any error. Hashes config.json, the tokenizer files, every safetensors header and file
size, and the first and last SAMPLE_BYTES of each file's data, so a re-conversion, another
fine-tune or a truncated copy changes it while hashing stays fast on a 40 GB model.

    python -m mlxrun.fingerprint PATH     # prints the fingerprint (used over ssh)
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

SAMPLE_BYTES = 1 << 16
# Files beside the weights that change what the ranks compute or decode.
_SIDE_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
               "chat_template.jinja", "generation_config.json")  # fmt: skip


def _hash_file_sample(h: hashlib.blake2b, file: Path) -> None:
    size = file.stat().st_size
    h.update(f"{file.name}:{size}".encode())
    with open(file, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        h.update(f.read(min(header_len, size)))  # the whole header: names, shapes, dtypes
        h.update(f.read(SAMPLE_BYTES))
        if size > 8 + header_len + 2 * SAMPLE_BYTES:
            f.seek(-SAMPLE_BYTES, 2)
            h.update(f.read(SAMPLE_BYTES))


def model_fingerprint(path: str | Path) -> str:
    """Hex digest of the model files at `path`; FileNotFoundError when it holds no weights."""
    path = Path(path)
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise FileNotFoundError(f"no *.safetensors weights in {path}")
    h = hashlib.blake2b(digest_size=12)
    for name in _SIDE_FILES:
        side = path / name
        if side.is_file():
            h.update(name.encode() + b"\0" + side.read_bytes())
    for file in weights:
        _hash_file_sample(h, file)
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m mlxrun.fingerprint PATH", file=sys.stderr)
        return 2
    try:
        print(model_fingerprint(args[0]))
    except OSError as e:
        print(f"no model: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
