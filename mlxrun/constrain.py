"""Constrained decoding: a grammar (JSON schema, any JSON object, Lark/GBNF) decides which tokens
may come next, so the output always parses.

llguidance does the work: it computes a request's next-token mask in well under a millisecond,
takes a Hugging Face tokenizer as it is, needs no torch, ships wheels for macOS arm64, and reports
unsupported JSON-schema keywords by name (which becomes the 400 a client sees).

    compiler = GrammarCompiler(tokenizer)              # once per model (builds the token trie)
    c = compiler.json_schema(schema, param="response_format")   # raises InvalidRequestError
    Request(..., constraint=c)                         # one Constraint per request: it has state

The engine calls `advance(token)` for each token the request generated and `fill_mask` before it
samples; once the grammar is complete only the end-of-sequence tokens stay allowed.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from mlxrun.errors import InvalidRequestError

if TYPE_CHECKING:
    from mlxrun.tokenizer import Tokenizer

# Compact JSON, as OpenAI's structured outputs write it: free whitespace would let a model loop
# on blanks until max_tokens.
GRAMMAR_CACHE_SIZE = 64
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _llguidance() -> Any:
    import llguidance

    return llguidance


class Constraint:
    """One request's grammar state (not shareable: make one per choice with `copy()`)."""

    def __init__(self, matcher: Any, vocab_size: int, eos_ids: Iterable[int]):
        self._matcher = matcher
        self.vocab_size = vocab_size
        self._eos = sorted(eos_ids)

    def copy(self) -> Constraint:
        return Constraint(self._matcher.deep_copy(), self.vocab_size, self._eos)

    @property
    def done(self) -> bool:
        """The grammar is complete: only end-of-sequence may follow."""
        return self._matcher.is_stopped()

    @property
    def error(self) -> str | None:
        return self._matcher.get_error() if self._matcher.is_error() else None

    def advance(self, token: int) -> None:
        """The request generated `token` (the mask allowed it, so this cannot fail)."""
        if not self._matcher.is_stopped():
            self._matcher.consume_token(int(token))

    def fill_mask(self, bitmask: np.ndarray, row: int) -> None:
        """Write the allowed next tokens as bits into `bitmask[row]` (int32 words, 32 ids each).

        A matcher in an error state (it should never get there) allows only end-of-sequence, so
        the request ends instead of producing text the grammar does not allow.
        """
        if self._matcher.is_error():
            words = bitmask[row].view(np.uint32)
            words[:] = 0
            for t in self._eos:
                words[t // 32] |= np.uint32(1 << (t % 32))
            return
        v = bitmask[row]
        self._matcher.unsafe_compute_mask_ptr(v.ctypes.data, v.size * v.itemsize)


def allowed_mask(constraints: list[Constraint | None], width: int) -> np.ndarray:
    """(rows, width) bool: the tokens each row may sample (unconstrained rows: all of them).

    `width` is the logits' width; ids past the tokenizer's vocabulary (padding rows of the
    embedding) are never allowed to a constrained row.
    """
    vocab = max(c.vocab_size for c in constraints if c is not None)
    words = (vocab + 31) // 32
    bits = np.full((len(constraints), words), -1, dtype=np.int32)
    for i, c in enumerate(constraints):
        if c is not None:
            c.fill_mask(bits, i)
    mask = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little").astype(bool)
    if mask.shape[1] >= width:
        return mask[:, :width]
    pad = np.zeros((len(constraints), width - mask.shape[1]), dtype=bool)
    for i, c in enumerate(constraints):
        if c is None:
            pad[i] = True
    return np.concatenate([mask, pad], axis=1)


class GrammarCompiler:
    """Turns grammars into Constraints for one tokenizer. Thread-safe; the token trie is built
    on first use (tens of milliseconds for a 150k vocabulary)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._lltok: Any = None
        self._lock = threading.Lock()
        # Compiled grammars by text: editors resend the same tools and schemas on every turn.
        self._compiled: OrderedDict[str, Constraint] = OrderedDict()

    @property
    def lltokenizer(self) -> Any:
        with self._lock:
            if self._lltok is None:
                self._lltok = self._build_lltokenizer()
            return self._lltok

    def _build_lltokenizer(self) -> Any:
        import llguidance.hf

        tok = self.tokenizer
        try:
            return llguidance.hf.from_tokenizer(
                tok.backend, n_vocab=tok.vocab_size, eos_token=sorted(tok.eos_token_ids)
            )
        except ValueError as e:  # a slow (Python-only) tokenizer
            raise InvalidRequestError(
                f"constrained decoding needs a fast tokenizer: {e}",
                param="response_format",
                hint="Use a model that ships tokenizer.json.",
            ) from None

    # -- grammar sources --------------------------------------------------------------------

    def json_schema(self, schema: Mapping[str, Any] | bool, param: str) -> Constraint:
        """Output that validates against `schema`; unsupported keywords are a 400 naming them."""
        lg = _llguidance()
        try:
            grammar = lg.LLMatcher.grammar_from_json_schema(
                json.dumps(schema), defaults=dict(_JSON_OPTIONS)
            )
        except (ValueError, TypeError) as e:
            raise InvalidRequestError(f"invalid JSON schema: {e}", param=param) from None
        return self.compile(grammar, param, what="JSON schema")

    def json_object(self, param: str) -> Constraint:
        """Any JSON object (OpenAI's "json_object" response format)."""
        return self.json_schema({"type": "object"}, param)

    def lark(self, text: str, param: str) -> Constraint:
        """A Lark or GBNF (llama.cpp) grammar."""
        from llguidance.gbnf_to_lark import any_to_lark

        try:
            lark = any_to_lark(text)
        except Exception as e:  # noqa: BLE001 - the converter raises plain Exceptions
            raise InvalidRequestError(f"cannot read the grammar: {e}", param=param) from None
        return self.compile(_llguidance().LLMatcher.grammar_from_lark(lark), param, "grammar")

    def compile(self, grammar: str, param: str, what: str = "grammar") -> Constraint:
        """A Constraint for an llguidance grammar string; InvalidRequestError when it is not
        valid or uses what llguidance does not support (its message names the feature)."""
        with self._lock:
            hit = self._compiled.get(grammar)
            if hit is not None:
                self._compiled.move_to_end(grammar)
                return hit.copy()
        built = self._build(grammar, param, what)
        with self._lock:
            self._compiled[grammar] = built
            while len(self._compiled) > GRAMMAR_CACHE_SIZE:
                self._compiled.popitem(last=False)
        return built.copy()

    def _build(self, grammar: str, param: str, what: str) -> Constraint:
        lg = _llguidance()
        lltok = self.lltokenizer
        is_error, messages = lg.LLMatcher.validate_grammar_with_warnings(grammar, lltok)
        if is_error:
            detail = messages[0] if messages else "invalid"
            raise InvalidRequestError(
                f"this {what} is not supported: {_short(detail)}",
                param=param,
                hint="Simplify the schema: conditional keywords (if/then/else), look-around "
                "regexes and unresolvable $refs cannot be enforced.",
            )
        matcher = lg.LLMatcher(lltok, grammar, log_level=0)
        if matcher.is_error():
            raise InvalidRequestError(
                f"this {what} is not supported: {_short(matcher.get_error())}", param=param
            )
        return Constraint(matcher, lltok.vocab_size, self.tokenizer.eos_token_ids)


def _short(message: str, limit: int = 400) -> str:
    message = " ".join(message.split())
    return message if len(message) <= limit else message[: limit - 1] + "…"
