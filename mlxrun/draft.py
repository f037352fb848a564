"""A draft model: a small model with the target's tokenizer proposes k tokens per running row.

    draft = load_draft("pycode-3m", target_tokenizer)      # IncompatibleDraftError on mismatch
    EngineConfig(speculate=SpecConfig(draft=draft))

The draft keeps its own batch KV cache, one row per request of the target's batch, mirrored at
each speculative step (rows that left are filtered out, new rows prefill their prompt alone and
join). A row's draft cache may lag its context (plain steps do not feed the draft): the lag is
fed first, right-padded across rows in one pass, then K - 1 single-token passes draw K greedy
proposals for every row at once. Proposals are the draft's argmax, so q is one-hot and the
target's rejection sampling keeps the output distribution exact at any temperature.

After verification each row keeps its context plus its accepted proposals; the draft's KV of the
rest is rolled back exactly as the target's is (mlxrun.spec_step.rollback).
"""

from __future__ import annotations

from typing import Any, cast

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, KVCache

from mlxrun import models
from mlxrun.errors import IncompatibleDraftError


def check_same_tokenizer(target: Any, draft: Any, name: str) -> None:
    """The draft must map text to the same ids: same vocabulary, same special tokens."""
    if target.vocab_size != draft.vocab_size or target._vocab != draft._vocab:
        raise IncompatibleDraftError(
            f"the draft model {name} has another tokenizer than the target "
            f"({draft.vocab_size} vs {target.vocab_size} tokens, or different ids)"
        )
    if target.eos_token_ids != draft.eos_token_ids or target.bos_token_id != draft.bos_token_id:
        raise IncompatibleDraftError(
            f"the draft model {name} has other special tokens (bos/eos) than the target"
        )


def load_draft(name_or_path: str, target_tokenizer: Any, context: int | None = None) -> Draft:
    from mlxrun.loader import load

    model, tokenizer, info = load(name_or_path, context=context)
    check_same_tokenizer(target_tokenizer, tokenizer, info.name)
    if not all(type(c) is KVCache for c in models.make_cache(model)):
        raise IncompatibleDraftError(
            f"the draft model {info.name} keeps a cache that cannot be rolled back "
            "(sliding window or recurrent layers)"
        )
    return Draft(model, info.name)


class _DraftProposer:
    """A row's proposer when the draft fills proposals for the whole batch (see Draft.fill)."""

    kind = "draft"

    def propose(self, prompt: Any, output: Any, k: int) -> list[int]:
        return []

    def advance(self, proposed: int, accepted: int, bonus: int) -> int:
        return accepted


class Draft:
    """The draft model and its batch cache (used on the engine thread only)."""

    def __init__(self, model: Any, name: str = "draft"):
        self.model, self.name = model, name
        mx.eval(model.parameters())  # lazy weights belong to the loading thread's stream
        self.ids: list[str] = []
        self.caches: list | None = None
        self.known: dict[str, int] = {}  # tokens of each row's context in the draft cache
        self._fed: dict[str, int] = {}  # this step: context length when proposing
        self._width = 0  # proposals drawn this step (0: the draft did not run)

    def fresh(self) -> Draft:
        """The same model with an empty batch (each engine mirrors its own rows)."""
        return Draft(self.model, self.name)

    def proposer(self, seq: Any) -> _DraftProposer:
        return _DraftProposer()

    def fill(self, rows: list, seqs: list, fed: list[int], generated: list[bool], ks: list) -> None:
        """Greedy proposals (up to ks[i]) for every row whose proposer is the draft."""
        contexts = [
            s.prompt + s.generated + ([t] if g else [])
            for s, t, g in zip(seqs, fed, generated, strict=True)
        ]
        wants = [
            k if s.spec is not None and isinstance(s.spec.proposer, _DraftProposer) else 0
            for s, k in zip(seqs, ks, strict=True)
        ]
        width = max(wants, default=0)
        self._width = 0
        if width == 0:
            return
        self._mirror([s.id for s in seqs], contexts)
        drafted = self._draft(contexts, width)  # (B, width) lists
        for r, want in zip(rows, wants, strict=True):
            if want:
                r.proposal = drafted[r.index][:want]
        self._width = width

    def probs(self, row: Any) -> None:
        return None  # greedy proposals: q is one-hot

    def settle(self, accepted: list[int]) -> None:
        """Keep each row's context and accepted proposals in the draft cache, drop the rest."""
        if not self._width:
            return
        from mlxrun.spec_step import rollback

        fed_last = self._width - 1  # proposals fed to the draft (the last one never is)
        keep = [min(a, fed_last) for a in accepted]
        assert self.caches is not None  # proposals were made: the draft has its cache
        rollback(self.caches, [fed_last - k for k in keep])
        for rid, k in zip(self.ids, keep, strict=True):
            self.known[rid] = self._fed[rid] + k
        self._width = 0

    # -- the batch cache -------------------------------------------------------------------

    def _mirror(self, ids: list[str], contexts: list[list[int]]) -> None:
        """Make the draft batch hold exactly these rows, in this order."""
        keep = [self.ids.index(i) for i in ids if i in self.ids]
        if self.caches is not None and keep != list(range(len(self.ids))):
            if keep:
                for c in self.caches:
                    c.filter(keep)
            else:
                self.caches = None
        self.ids = [self.ids[i] for i in keep]
        for rid in set(self.known) - set(self.ids):
            del self.known[rid]
        for rid, ctx in zip(ids, contexts, strict=True):
            if rid not in self.ids:
                self._join(rid, ctx)
        if self.ids != ids:  # joiners went to the end: put the rows in the target's order
            order = [self.ids.index(i) for i in ids]
            for c in self.caches or ():
                c.filter(order)
            self.ids = list(ids)

    def _join(self, rid: str, context: list[int]) -> None:
        cache = models.make_cache(self.model)
        head = context[:-1]  # the last token is fed with the step (a row needs >= 1 to feed)
        if head:
            self.model(mx.array(head)[None], cache=cache)
        merged = [BatchKVCache.merge([c]) for c in cache]
        if self.caches is None:
            self.caches = merged
        else:
            for mine, theirs in zip(self.caches, merged, strict=True):
                mine.extend(theirs)
        self.ids.append(rid)
        self.known[rid] = len(head)

    def _draft(self, contexts: list[list[int]], width: int) -> list[list[int]]:
        """Feed each row's lag (right-padded), then draw `width` greedy tokens per row."""
        lags = [ctx[self.known[rid] :] for rid, ctx in zip(self.ids, contexts, strict=True)]
        from mlxrun.spec_step import bucket

        longest = bucket(max(len(g) for g in lags))  # padded: few shapes, few kernel compiles
        pads = [longest - len(g) for g in lags]
        tokens = mx.array([g + [0] * p for g, p in zip(lags, pads, strict=True)])  # (B, longest)
        assert self.caches is not None
        if max(pads):
            for c in self.caches:
                c.prepare(lengths=[len(g) for g in lags], right_padding=pads)
        logits = self.model(tokens, cache=self.caches)
        if max(pads):
            for c in self.caches:
                c.finalize()  # the pads roll to the left, where the mask hides them
        last = mx.array([len(g) - 1 for g in lags])
        nxt = mx.argmax(logits[mx.arange(len(lags)), last], axis=-1)  # (B,)
        out = [nxt]
        for _ in range(width - 1):
            nxt = mx.argmax(self.model(nxt[:, None], cache=self.caches)[:, -1], axis=-1)
            out.append(nxt)
        self._fed = {rid: len(ctx) for rid, ctx in zip(self.ids, contexts, strict=True)}
        return cast(list[list[int]], mx.stack(out, axis=1).tolist())
