"""Output stage between the engine (token ids) and the callers (text): detokenizing + stop strings.

out = TextOutput(tokenizer, stops=["\\n\\nUser:"])
for token_id in generated:
    delta, stopped = out.push(token_id)
    ...                       # send delta; on stopped, abort the request (finish_reason "stop")
delta = out.finish()          # at eos / max_tokens: what was held back
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlxrun.tokenizer import Tokenizer


class StopMatcher:
    """Cuts a text stream at the first occurrence of any stop string; the stop is never emitted.

    Text that could still be the start of a stop string is held back until it is decided, so a
    stop arriving in pieces ("\\n\\nUs" + "er:") is caught. "First" means the earliest start: when
    one stop completes while an earlier-starting one is still a partial match, it waits. The
    result never depends on how the text was split into chunks.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops: tuple[str, ...] = tuple(dict.fromkeys(s for s in stops if s))
        self._held = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the stream

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit now, whether a stop string completed)."""
        if self.stopped:
            return "", True
        buf = self._held + text
        if not self.stops:
            return buf, False
        hit = self._first_complete(buf)
        partial = self._first_partial(buf)
        if hit is not None and (partial is None or hit[0] <= partial):
            return self._stop(buf, hit)
        cut = len(buf) if partial is None else partial
        self._held = buf[cut:]
        return buf[:cut], False

    def flush(self) -> str:
        """At the end of the stream: what was held back (up to a stop string found in it)."""
        if self.stopped:
            return ""
        buf, self._held = self._held, ""
        hit = self._first_complete(buf)
        return self._stop(buf, hit)[0] if hit is not None else buf

    def _stop(self, buf: str, hit: tuple[int, str]) -> tuple[str, bool]:
        self.stopped, self.matched, self._held = True, hit[1], ""
        return buf[: hit[0]], True

    def _first_complete(self, buf: str) -> tuple[int, str] | None:
        """(start, stop) of the earliest complete occurrence; the shortest stop on a tie."""
        best: tuple[int, str] | None = None
        for stop in self.stops:
            at = buf.find(stop)
            if at >= 0 and (best is None or (at, len(stop)) < (best[0], len(best[1]))):
                best = (at, stop)
        return best

    def _first_partial(self, buf: str) -> int | None:
        """Earliest start of a tail of buf that is a proper prefix of some stop string."""
        longest = max(len(s) for s in self.stops)
        for start in range(max(0, len(buf) - longest + 1), len(buf)):
            tail = buf[start:]
            if any(len(s) > len(tail) and s.startswith(tail) for s in self.stops):
                return start
        return None


class TextOutput:
    """One request's output: token ids -> text deltas, cut at stop strings.

    `tokenizer` is a mlxrun Tokenizer (anything with detokenizer() and eos_token_ids). Eos ids are
    never turned into text. Special tokens are skipped by default (as OpenAI-style servers do);
    added tokens that are not special (e.g. <tool_call>) are kept.
    """

    def __init__(
        self, tokenizer: Tokenizer, stops: Sequence[str] = (), *, skip_special_tokens: bool = True
    ):
        self._detok = tokenizer.detokenizer(skip_special_tokens=skip_special_tokens)
        self._hidden = frozenset(getattr(tokenizer, "eos_token_ids", ()))
        self._stops = StopMatcher(stops)
        self._parts: list[str] = []
        self._finished = False

    @property
    def stopped(self) -> bool:
        """Whether a stop string ended the output (finish_reason "stop")."""
        return self._stops.stopped

    @property
    def matched_stop(self) -> str | None:
        return self._stops.matched

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._parts)

    def push(self, token_id: int) -> tuple[str, bool]:
        """(new text, stopped) after one generated token; after a stop, further ids are ignored."""
        if self._stops.stopped or self._finished:
            return "", self._stops.stopped
        if int(token_id) in self._hidden:
            return "", False
        delta, stopped = self._stops.feed(self._detok.add_token(int(token_id)))
        self._parts.append(delta)
        return delta, stopped

    def push_many(self, token_ids: Iterable[int]) -> tuple[str, bool]:
        """push() for the ids one engine step produced."""
        deltas = []
        stopped = False
        for token_id in token_ids:
            delta, stopped = self.push(token_id)
            deltas.append(delta)
            if stopped:
                break
        return "".join(deltas), stopped

    def finish(self) -> str:
        """The text held back, at the end of generation; check `stopped` afterwards (a stop string
        can complete in it). Idempotent."""
        if self._finished or self._stops.stopped:
            self._finished = True
            return ""
        self._finished = True
        emit, _ = self._stops.feed(self._detok.finalize())
        delta = emit + self._stops.flush()
        self._parts.append(delta)
        return delta
