"""ModelProtocol, the type every model-taking boundary declares, holds for mlx-lm's real classes.

mypy checks our side of the seam (we call only what the protocol names); this checks the other
side: each architecture the fixtures build has every member, and the forward pass and the
Module methods behave as the protocol's signatures say.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from fixtures.builder import ARCHS
from mlxrun.hfconfig import normalize
from mlxrun.loader import load
from mlxrun.models import ModelProtocol, build_model, make_cache
from mlxrun.tokenizer import Tokenizer

pytestmark = pytest.mark.model


@pytest.mark.parametrize("arch", ARCHS)
def test_every_fixture_architecture_is_a_model_protocol(
    arch: str, checkpoint_factory: Callable[..., Path]
) -> None:
    raw = json.loads((checkpoint_factory(arch) / "config.json").read_text())
    config = normalize(raw)  # as the loader reads it (transformers-5 layout)
    model = build_model(config)
    assert isinstance(model, ModelProtocol)
    assert len(model.layers) == config["num_hidden_layers"]
    modules = model.named_modules()
    assert modules and all(isinstance(m, nn.Module) for _, m in modules)
    names = [name for name, _ in tree_flatten(model.parameters())]
    assert "model.embed_tokens.weight" in names
    logits = model(mx.array([[1, 2, 3]]), cache=make_cache(model))
    assert logits.shape == (1, 3, config["vocab_size"])


def test_load_returns_the_typed_triple(tiny_llama: Path) -> None:
    model, tokenizer, info = load(tiny_llama)
    assert isinstance(model, ModelProtocol) and isinstance(tokenizer, Tokenizer)
    assert info.context_length > 0


def test_an_object_without_the_hooks_is_not_a_model() -> None:
    class Half:
        layers: list[object] = []

        def __call__(self, inputs: mx.array, cache: object = None) -> mx.array:
            return inputs

    assert not isinstance(Half(), ModelProtocol)  # no parameters / named_modules / load_weights
