"""Our loader + generation loop against the oracle: transformers on PyTorch CPU, float32.

For every fixture architecture: logits of a full forward pass, logits computed token by token
through the KV cache, and 32 greedy tokens from `generate_stream` must all agree. The fixtures'
config.json is what transformers' save_pretrained writes (5.x: `rope_parameters`, `dtype`), with
a rope_theta other than the mlx-lm class's default, so a dropped key shows in the logits.
"""

from __future__ import annotations

import numpy as np
import pytest

from fixtures import ARCHS

pytestmark = pytest.mark.model

ATOL = 1e-4
RTOL = 1e-4
PROMPT_LEN = 32
NEW_TOKENS = 32


@pytest.fixture(scope="module", params=ARCHS)
def pair(request, checkpoint_factory):
    """(arch, our model, our tokenizer, the transformers model, prompt ids), built once per arch."""
    import torch
    from transformers import AutoModelForCausalLM

    from mlxrun.loader import load

    path = checkpoint_factory(arch=request.param)
    model, tokenizer, _ = load(str(path))
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rng = np.random.default_rng(sum(map(ord, request.param)))
    # Random ids below the trained vocabulary: every id has a real embedding row.
    prompt = rng.integers(3, 900, size=PROMPT_LEN).tolist()
    return request.param, model, tokenizer, ref, prompt


def _ref_logits(ref, prompt: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return ref(torch.tensor([prompt])).logits[0].numpy()  # (L, V)


def test_full_forward_matches(pair):
    import mlx.core as mx

    arch, model, _, ref, prompt = pair
    ours = np.array(model(mx.array([prompt]))[0].astype(mx.float32))  # (L, V)
    theirs = _ref_logits(ref, prompt)
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, atol=ATOL, rtol=RTOL, err_msg=arch)


def test_token_by_token_through_cache_matches(pair):
    import mlx.core as mx

    from mlxrun.models import make_cache

    arch, model, _, ref, prompt = pair
    cache = make_cache(model)
    rows = []
    for token in prompt:
        logits = model(mx.array([[token]]), cache=cache)  # (1, 1, V)
        rows.append(np.array(logits[0, -1].astype(mx.float32)))
    assert cache[0].offset == len(prompt)
    np.testing.assert_allclose(
        np.stack(rows), _ref_logits(ref, prompt), atol=ATOL, rtol=RTOL, err_msg=arch
    )


def test_greedy_generation_is_token_identical(pair):
    import torch

    from mlxrun.generate import generate_stream
    from mlxrun.sampling import SamplingParams

    arch, model, tokenizer, ref, prompt = pair
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    chunks = list(generate_stream(model, tokenizer, prompt, params, prefill_step_size=8))
    ours = [c.token_id for c in chunks]
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].generation_tokens == NEW_TOKENS

    # The oracle must not stop at EOS either; no eos id means no stopping and no suppression
    # (min_new_tokens alone would mask EOS logits, which ignore_eos does not do).
    with torch.no_grad():
        out = ref.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            eos_token_id=None,
            pad_token_id=0,
        )
    theirs = out[0, len(prompt) :].tolist()
    assert ours == theirs, arch
