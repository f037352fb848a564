"""Token texts for logprob reports: each token's own text and bytes (also for UTF-8 fragments)."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlxrun.tokenizer import Tokenizer


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, inverted: printable stand-in character -> byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = list(keep)
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars, strict=True)}


def token_bytes(tokenizer: Tokenizer, token_id: int) -> bytes:
    """A token's own bytes, also for tokens that are a fragment of a UTF-8 character."""
    text = tokenizer.decode([token_id])
    if "\ufffd" not in text:
        return text.encode("utf-8")
    piece = tokenizer.id_to_token(token_id) or ""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # SentencePiece byte
        try:
            return bytes([int(piece[3:5], 16)])
        except ValueError:
            pass
    table = _byte_decoder()
    if piece and all(ch in table for ch in piece):  # byte-level BPE
        return bytes(table[ch] for ch in piece)
    return text.encode("utf-8")


class TokenTexts:
    """Cached (text, bytes) per token id for logprob reports."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self.get = functools.lru_cache(maxsize=1 << 16)(self._compute)

    def _compute(self, token_id: int) -> tuple[str, list[int]]:
        raw = token_bytes(self._tokenizer, token_id)
        return raw.decode("utf-8", errors="replace"), list(raw)
