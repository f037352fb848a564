"""Where proposed tokens come from, and how many each request gets (no MLX here).

Proposers (per request, chosen at admission):
- `PredictionProposer`: OpenAI Predicted Outputs. The request's `prediction` (token ids) is
  the text the answer is expected to copy; proposals are what follows, in the prediction, the
  last tokens of the output. A pointer follows the output through the prediction, so after an
  edited region the output re-synchronises on the next run of matching tokens.
- `NgramProposer`: prompt lookup. The same search over the request's own prompt + output (the
  latest earlier occurrence of its last n tokens); no second model.
- A draft model (mlxrun.draft) proposes for every row at once; it is not in this module.

`Acceptance` keeps one request's recent acceptance (a decayed count of accepted proposals and
of rejections, the maximum-likelihood estimate of a per-token acceptance rate alpha), and
`tokens_to_propose` gives k: proposals pay when the extra tokens per proposal,
(E[k] - 1) / k with E[k] = (1 - alpha^(k+1)) / (1 - alpha) the tokens a verify yields, beat a
threshold, the share of a step's cost one more token in the forward adds (about 0 where a step
is memory-bound, as on Metal at small batches; about 1 where it is compute-bound). `Payoff`
sets that threshold from the engine's own step times, per batch size: speculative steps slower
than plain ones raise it, so a full batch speculates only for requests whose acceptance is
high, and a request whose acceptance makes speculation a loss stops (probing now and then).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np

PROBE_EVERY = 32  # steps between trial proposals of a request that stopped speculating
EXPLORE_EVERY = 32  # steps between plain steps taken to re-measure their cost (Payoff)


def lookup(
    haystack: np.ndarray, tail: np.ndarray, k: int, max_n: int, min_n: int, after: int = 0
) -> tuple[list[int], int]:
    """Tokens following an occurrence of the last n tokens of `tail` in `haystack` (largest n
    first, n in [min_n, max_n]); the first occurrence ending at or after `after`, else the
    latest. Returns (up to k tokens, where they start in haystack) or ([], -1)."""
    for n in range(min(max_n, len(tail)), min_n - 1, -1):
        if len(haystack) <= n:
            continue
        suffix = tail[-n:]
        windows = np.lib.stride_tricks.sliding_window_view(haystack[:-1], n)
        ends = np.flatnonzero((windows == suffix).all(axis=1)) + n  # index after each match
        if ends.size == 0:
            continue
        later = ends[ends >= after]
        end = int(later[0]) if later.size else int(ends[-1])
        return haystack[end : end + k].tolist(), end
    return [], -1


class PredictionProposer:
    """Proposals from a prediction of the output (OpenAI `prediction`)."""

    kind = "prediction"

    def __init__(self, prediction: Sequence[int], max_n: int = 8):
        self.ids = np.asarray(list(prediction), dtype=np.int64)
        self.max_n = max_n
        self.pos = 0  # where, in the prediction, the output is expected to continue
        self.seen = 0  # output tokens accounted for (OpenAI's accepted_prediction_tokens)
        self.matched = 0  # output tokens the prediction had, in its order

    def _catch_up(self, output: Sequence[int]) -> None:
        """Tokens plain steps made since the last verify: those the prediction has next count."""
        for token in output[self.seen :]:
            if self.pos < len(self.ids) and self.ids[self.pos] == token:
                self.matched += 1
                self.pos += 1
        self.seen = len(output)

    def propose(self, prompt: Sequence[int], output: Sequence[int], k: int) -> list[int]:
        if k <= 0 or not len(self.ids):
            return []
        self._catch_up(output)
        if not output:
            return self.ids[:k].tolist()
        tail = np.asarray(output[-self.max_n :], dtype=np.int64)
        if self.pos < len(self.ids) and self.pos > 0 and self.ids[self.pos - 1] == tail[-1]:
            start = self.pos  # still on track: continue where the last proposal ended
            found = self.ids[start : start + k].tolist()
        else:
            found, start = lookup(self.ids, tail, k, self.max_n, 1, after=self.pos)
        if found:
            self.pos = start
        return found

    def advance(self, proposed: int, accepted: int, bonus: int) -> int:
        """Move past a verify's output; returns how many of its tokens the prediction had
        (the bonus counts when it is the prediction's next token: OpenAI's accepted tokens)."""
        used = accepted
        if accepted == proposed and self.pos + accepted < len(self.ids):
            used += int(self.ids[self.pos + accepted] == bonus)
        self.pos += accepted + 1  # a rejected token is most often replaced by the bonus
        self.seen += accepted + 1
        self.matched += used
        return used


class NgramProposer:
    """Prompt lookup: proposals copied from the request's own prompt and output."""

    kind = "ngram"

    def __init__(self, max_n: int = 4, min_n: int = 2):
        self.max_n, self.min_n = max_n, min_n

    def propose(self, prompt: Sequence[int], output: Sequence[int], k: int) -> list[int]:
        if k <= 0:
            return []
        ids = np.asarray(list(prompt) + list(output), dtype=np.int64)
        found, _ = lookup(ids, ids[-self.max_n :], k, self.max_n, self.min_n, after=len(ids))
        return found

    def advance(self, proposed: int, accepted: int, bonus: int) -> int:
        return accepted


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens one verify of k proposals yields (accepted + the bonus) at acceptance rate alpha."""
    if alpha >= 1.0:
        return k + 1.0
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def tokens_to_propose(alpha: float, threshold: float, k_max: int) -> int:
    """The largest k <= k_max whose extra tokens per proposal beat `threshold` (0: none pays)."""
    best = 0
    for k in range(1, k_max + 1):
        if (expected_tokens(alpha, k) - 1.0) / k > threshold:
            best = k
    return best


class Acceptance:
    """One request's recent acceptance, decayed so that it follows what the output does now."""

    def __init__(self, prior: float, decay: float = 0.8, weight: float = 2.0):
        self.accepted = prior * weight  # a prior worth `weight` proposals
        self.trials = weight
        self.decay = decay
        self.idle = 0  # steps since it last proposed

    @property
    def alpha(self) -> float:
        return self.accepted / self.trials if self.trials > 0 else 0.0

    def update(self, proposed: int, accepted: int) -> None:
        """A verify of `proposed` tokens kept `accepted`: accepted successes, one failure if any
        was rejected (each proposal is a trial only until the first rejection)."""
        rejected = 1 if accepted < proposed else 0
        self.accepted = self.accepted * self.decay + accepted
        self.trials = self.trials * self.decay + accepted + rejected
        self.idle = 0

    def k(self, threshold: float, k_max: int) -> int:
        k = tokens_to_propose(self.alpha, threshold, k_max)
        if k == 0:
            self.idle += 1
            if self.idle >= PROBE_EVERY:  # try again: the output may be copying by now
                return 1
        return k


class Payoff:
    """Whether speculating pays on this machine, at this batch size, now: the median seconds
    per emitted token of recent speculative steps against that of plain steps, per batch-size
    bucket (powers of two). While speculative steps are the slower, the bucket's threshold for
    `tokens_to_propose` rises (1 stops everyone but the probes); while they are faster it falls
    back to the prior. A step's time runs from the previous step's end, so an idle gap or a
    prefill lands in it too: the median keeps those from deciding."""

    def __init__(self, prior: float = 0.1, window: int = 16):
        self.prior = prior
        self.window = window
        self.costs: dict[tuple[int, bool], deque] = {}
        self.thresholds: dict[int, float] = {}
        self.steps: dict[int, int] = {}

    @staticmethod
    def bucket(rows: int) -> int:
        return max(rows, 1).bit_length()

    def cost(self, rows: int, spec: bool) -> float | None:
        samples = self.costs.get((self.bucket(rows), spec))
        return float(np.median(samples)) if samples else None

    def observe(self, rows: int, spec: bool, tokens: int, seconds: float) -> None:
        if tokens <= 0 or seconds <= 0:
            return
        key = (self.bucket(rows), spec)
        self.costs.setdefault(key, deque(maxlen=self.window)).append(seconds / tokens)
        plain, fast = self.cost(rows, False), self.cost(rows, True)
        if not spec or plain is None or fast is None:
            return
        now = self.thresholds.get(key[0], self.prior)
        step = 0.1 if fast > plain else -0.05
        self.thresholds[key[0]] = min(1.0, max(self.prior, now + step))

    def threshold(self, rows: int) -> float:
        return self.thresholds.get(self.bucket(rows), self.prior)

    def explore(self, rows: int) -> bool:
        """Whether the next step should be plain to measure what plain steps cost (a few at
        first, then one every EXPLORE_EVERY steps of this batch size)."""
        b = self.bucket(rows)
        self.steps[b] = self.steps.get(b, 0) + 1
        plain = self.costs.get((b, False))
        return plain is None or len(plain) < 3 or self.steps[b] % EXPLORE_EVERY == 0
