"""A draft model inside the batch: greedy output identical to plain decoding with a draft that
agrees (the target itself) and one that never does (a random 1-layer model with the same
tokenizer); the draft's own KV after a rejection equals a fresh prefill of what was kept; a draft
with another tokenizer is refused at load."""

from __future__ import annotations

import random
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

from mlxrun.draft import Draft, load_draft
from mlxrun.engine import Engine, EngineConfig, Request
from mlxrun.errors import IncompatibleDraftError
from mlxrun.models import make_cache
from mlxrun.sampling import SamplingParams
from mlxrun.spec_step import RowSpec, SpecConfig, _Row
from mlxrun.speculate import Acceptance

pytestmark = pytest.mark.model

GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)


@pytest.fixture(scope="module")
def lm(checkpoint_factory):
    from mlxrun.loader import load

    return load(str(checkpoint_factory("llama")))


@pytest.fixture(scope="module")
def small_draft(checkpoint_factory):
    """A 1-layer model with the target's tokenizer and other random weights."""
    return checkpoint_factory("llama", num_layers=1, seed=1, num_shards=1)


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, 400) for _ in range(rng.randrange(4, 30))] for _ in range(n)]


def _run(lm, spec: SpecConfig, prompts, params=GREEDY):
    cfg = EngineConfig(eos_token_ids=lm[2].eos_token_ids, cache_memory_bytes=0, speculate=spec)
    with Engine(lm[0], cfg).start() as engine:
        streams = [engine.submit_sync(Request(f"r{i}", p, params)) for i, p in enumerate(prompts)]
        out = [[t for e in s for t in e.new_token_ids] for s in streams]
        return out, engine.stats()


@pytest.mark.parametrize("which", ["target_itself", "small_random"])
def test_a_draft_keeps_greedy_output_identical(lm, checkpoint_factory, small_draft, which):
    path = checkpoint_factory("llama") if which == "target_itself" else small_draft
    draft = load_draft(str(path), lm[1])
    prompts = _prompts(5)
    plain, _ = _run(lm, SpecConfig(), prompts)
    out, stats = _run(lm, SpecConfig(draft=draft, adaptive=False, max_k=4), prompts)
    assert out == plain
    assert stats["spec_proposed_tokens"] > 0
    if which == "target_itself":
        assert stats["spec_acceptance_rate"] == 1.0
        assert stats["spec_tokens_per_row_step"] == 5.0
    else:
        assert stats["spec_acceptance_rate"] < 0.5


def test_sampled_rows_with_a_draft_stay_reproducible_by_seed(lm):
    draft = Draft(lm[0])
    params = SamplingParams(temperature=0.5, top_k=2, seed=5, max_tokens=16)
    prompts = _prompts(3, seed=1)
    spec = SpecConfig(draft=draft, adaptive=False)
    first, stats = _run(lm, spec, prompts, params)
    again, _ = _run(lm, spec, prompts, params)
    assert first == again and stats["spec_accepted_tokens"] > 0


def test_the_drafts_kv_after_a_rejection_is_a_prefill_of_what_was_kept(lm, small_draft):
    from mlxrun.loader import load

    model = load(str(small_draft))[0]
    draft = Draft(model)
    prompts = [[5, 9, 33, 71, 2, 8, 100], [40, 41, 42]]
    seqs = []
    for i, p in enumerate(prompts):
        spec = RowSpec(draft.proposer(None), Acceptance(0.5))
        seqs.append(SimpleNamespace(id=f"s{i}", prompt=p, generated=[], spec=spec))
    rows = [_Row(i, []) for i in range(2)]
    draft.fill(rows, seqs, [0, 0], [False, False], [3, 3])
    assert all(len(r.proposal) == 3 for r in rows)
    kept = [2, 0]
    draft.settle(kept)
    for i, p in enumerate(prompts):
        context = p + rows[i].proposal[: kept[i]]
        ref = make_cache(model)
        model(mx.array(context)[None], cache=ref)
        assert draft.known[f"s{i}"] == len(context)
        for layer, r in zip(draft.caches, ref, strict=True):
            got = layer.extract(i)
            assert got.offset == r.offset
            np.testing.assert_allclose(got.keys, r.keys[..., : r.offset, :], atol=1e-5)
            np.testing.assert_allclose(got.values, r.values[..., : r.offset, :], atol=1e-5)


def test_a_draft_with_another_tokenizer_is_refused(lm, checkpoint_factory):
    other = checkpoint_factory("llama", tokenizer="spm", num_layers=1, num_shards=1)
    with pytest.raises(IncompatibleDraftError, match="tokenizer"):
        load_draft(str(other), lm[1])
