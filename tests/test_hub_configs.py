"""Checkpoints as transformers 5 writes them (rope_parameters, dtype, layer_types…) load right.

The oracle is transformers itself (PyTorch CPU, float32) on the same directory: logits through
`mlxrun.load`, and through plain `mlx_lm.load` of our converted output, must match it for every
fixture architecture and for each RoPE scaling type the architecture's mlx-lm class applies. A
scaling the class would drop is refused with UnsupportedModelError instead of loading wrong.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from fixtures import ARCHS
from mlxrun.errors import UnsupportedModelError

pytestmark = pytest.mark.model

ATOL = 1e-4
RTOL = 1e-4
# Past the (short) pretraining length of the dynamic and longrope fixtures, so they switch on.
PROMPT = list(range(5, 37))
# (arch, rope_scaling) pairs whose mlx-lm class applies that scaling.
SCALED = [
    ("llama", "linear"),
    ("llama", "dynamic"),
    ("llama", "yarn"),
    ("llama", "llama3"),
    ("qwen2", "yarn"),
    ("phi3", "longrope"),
]
# The class would build a plain RoPE and ignore these.
REFUSED = [("mixtral", "linear"), ("qwen3_moe", "yarn"), ("gemma2", "linear")]


def _reference(path) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return ref(torch.tensor([PROMPT])).logits[0].numpy()  # (L, V)


def _logits(model) -> np.ndarray:
    import mlx.core as mx

    return np.array(model(mx.array([PROMPT]))[0].astype(mx.float32))  # (L, V)


def _assert_v5_layout(path) -> None:
    config = json.loads((path / "config.json").read_text())
    assert "rope_parameters" in config and "rope_theta" not in config
    assert "dtype" in config and "torch_dtype" not in config


@pytest.mark.parametrize("config_format", ["transformers5", "transformers4"])
@pytest.mark.parametrize("arch,rope", SCALED)
def test_scaled_rope_matches_transformers(arch, rope, config_format, checkpoint_factory):
    from mlxrun.loader import load

    path = checkpoint_factory(arch=arch, rope_scaling=rope, config_format=config_format)
    config = json.loads((path / "config.json").read_text())
    if config_format == "transformers5":
        _assert_v5_layout(path)
        assert config["rope_parameters"]["rope_type"] == rope
    else:
        assert config["rope_scaling"]["rope_type"] == rope
    model, _, _ = load(str(path))
    np.testing.assert_allclose(_logits(model), _reference(path), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("arch,rope", [(a, "none") for a in ARCHS] + SCALED)
def test_converted_output_reads_right_in_mlx_lm(arch, rope, checkpoint_factory, tmp_path):
    """mlx-community users load our output with plain mlx-lm: the legacy keys must be there."""
    from mlx_lm import load as mlx_lm_load

    from mlxrun.convert.api import convert_model

    path = checkpoint_factory(arch=arch, rope_scaling=rope)
    _assert_v5_layout(path)
    out = tmp_path / "out"
    convert_model(str(path), out, quantize=False, verify=False, quiet=True)
    config = json.loads((out / "config.json").read_text())
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]
    model, _ = mlx_lm_load(str(out))
    np.testing.assert_allclose(_logits(model), _reference(path), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("arch,rope", REFUSED)
def test_scaling_the_class_ignores_is_a_typed_error(arch, rope, checkpoint_factory, tmp_path):
    from mlxrun.convert.api import convert_model
    from mlxrun.loader import load

    path = checkpoint_factory(arch=arch, rope_scaling=rope)
    with pytest.raises(UnsupportedModelError, match=repr(rope)):
        load(str(path))
    with pytest.raises(UnsupportedModelError, match=repr(rope)):
        convert_model(str(path), tmp_path / "out", verify=False, quiet=True)
    assert not (tmp_path / "out").exists()


def test_unapplied_sliding_window_caps_the_context(checkpoint_factory):
    """mlx-lm's gemma2 attends to every token; transformers only to the window: agree up to it."""
    from fixtures.builder import GEMMA2_SLIDING_WINDOW
    from mlxrun.loader import load

    path = checkpoint_factory(arch="gemma2")
    _, _, info = load(str(path))
    assert info.context_length == GEMMA2_SLIDING_WINDOW
    _, _, info = load(str(path), context=GEMMA2_SLIDING_WINDOW)
    assert info.context_length == GEMMA2_SLIDING_WINDOW
    with pytest.raises(UnsupportedModelError, match="sliding_window"):
        load(str(path), context=GEMMA2_SLIDING_WINDOW + 1)
