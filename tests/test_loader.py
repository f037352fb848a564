"""The loader: lazy weights, mlx-lm interop on quantized models, store names, errors, memory check."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest

from mlxrun.errors import (
    CorruptCheckpointError,
    InsufficientMemoryError,
    ModelNotFoundError,
    NotAModelError,
    UnsupportedModelError,
)
from mlxrun.loader import load

PROMPT = [1, 17, 42, 99, 5, 8, 300, 301]


def _greedy_ids(model, prompt: list[int], n: int = 16) -> list[int]:
    """A plain greedy loop, identical for both loaders' models."""
    from mlxrun.models import make_cache

    cache = make_cache(model)
    x, out = mx.array([prompt]), []
    for _ in range(n):
        tok = int(mx.argmax(model(x, cache=cache)[0, -1]).item())
        out.append(tok)
        x = mx.array([[tok]])
    return out


def _ours_stream(model, tokenizer, prompt: list[int], n: int = 16) -> list[int]:
    from mlxrun.generate import generate_stream
    from mlxrun.sampling import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    return [c.token_id for c in generate_stream(model, tokenizer, prompt, params)]


@pytest.mark.model
def test_weights_load_lazily(checkpoint_factory):
    path = checkpoint_factory("llama", hidden_size=256, intermediate_size=512, num_layers=4)
    mx.clear_cache()
    before = mx.get_active_memory()
    model, _, info = load(str(path))
    after_load = mx.get_active_memory() - before
    assert info.weights_bytes > 10_000_000
    # Nothing has been read yet: well under a tenth of the weights is allocated.
    assert after_load < info.weights_bytes // 10
    mx.eval(model(mx.array([PROMPT])))
    after_forward = mx.get_active_memory() - before
    assert after_forward > 0.9 * info.weights_bytes


@pytest.mark.model
def test_float_checkpoint_info(checkpoint_factory):
    path = checkpoint_factory("llama")
    model, tokenizer, info = load(str(path))
    assert info.architecture == "llama"
    assert info.context_length == 2048
    assert info.quantization == "f32"
    assert info.bits_per_weight == pytest.approx(32.0)
    # 2 layers x (K + V) x 2 kv heads x head_dim 32 x 4 bytes (float32 activations).
    assert info.kv_bytes_per_token == 2 * 2 * 2 * 32 * 4
    assert set(info.eos_token_ids) <= set(tokenizer.eos_token_ids)
    assert set(info.eos_token_ids) == {0, 2}  # generation_config.json lists both
    assert not any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())


@pytest.mark.model
@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_converted_4bit_matches_mlx_lm_load(arch, checkpoint_factory, tmp_path):
    from mlx_lm import load as mlx_lm_load

    from mlxrun.convert.api import convert_model

    out = tmp_path / "q4"
    convert_model(str(checkpoint_factory(arch)), out, bits=4, verify=False, quiet=True)
    ours, tokenizer, info = load(str(out))
    theirs, _ = mlx_lm_load(str(out))
    assert info.quantization == "4-bit g64"
    assert 4.0 < info.bits_per_weight < 5.5
    x = mx.array([PROMPT])
    assert mx.array_equal(ours(x), theirs(x)).item()
    expected = _greedy_ids(theirs, PROMPT)
    assert _greedy_ids(ours, PROMPT) == expected
    assert _ours_stream(ours, tokenizer, PROMPT) == expected


@pytest.mark.model
@pytest.mark.parametrize("recipe", [None, "mixed_3_6"])
def test_mlx_lm_convert_output_loads(recipe, checkpoint_factory, tmp_path):
    """mlx_lm.convert's output (uniform, and mixed with per-layer overrides) through our loader."""
    from mlx_lm import load as mlx_lm_load
    from mlx_lm.convert import convert

    out = tmp_path / "mlx_lm"
    # 4.x layout: mlx_lm.convert copies config.json as is, and plain mlx-lm reads only 4.x keys.
    src = checkpoint_factory("llama", num_layers=4, config_format="transformers4")
    convert(str(src), str(out), quantize=True, q_bits=4, q_group_size=64, quant_predicate=recipe)
    quant = json.loads((out / "config.json").read_text())["quantization"]
    overrides = {k: v for k, v in quant.items() if isinstance(v, dict)}
    assert bool(overrides) == (recipe is not None)

    ours, tokenizer, _ = load(str(out))
    theirs, _ = mlx_lm_load(str(out))
    for name, module in ours.named_modules():
        if name in overrides:
            assert module.bits == overrides[name]["bits"], name
    x = mx.array([PROMPT])
    assert mx.array_equal(ours(x), theirs(x)).item()
    expected = _greedy_ids(theirs, PROMPT)
    assert _ours_stream(ours, tokenizer, PROMPT) == expected


@pytest.mark.model
def test_store_name_and_suggestions(checkpoint_factory, tmp_path):
    from mlxrun.store import models_dir

    models_dir().mkdir(parents=True, exist_ok=True)
    shutil.copytree(checkpoint_factory("llama"), models_dir() / "tiny-coder")
    _, _, info = load("tiny-coder")
    assert info.name == "tiny-coder"
    assert info.path == models_dir() / "tiny-coder"

    with pytest.raises(ModelNotFoundError) as exc:
        load("tiny-codr")
    assert "tiny-coder" in exc.value.hint and "mlxrun list" in exc.value.hint
    with pytest.raises(ModelNotFoundError) as exc:
        load("nothing-like-it")
    assert "mlxrun list" in exc.value.hint


@pytest.mark.model
def test_local_path_name(checkpoint_factory):
    path = checkpoint_factory("qwen2")
    _, _, info = load(path)
    assert info.path == path and info.name == path.name and info.architecture == "qwen2"


@pytest.mark.pure
def test_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(NotAModelError):
        load(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(NotAModelError):  # no weights
        load(str(tmp_path))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.model
def test_unsupported_architecture(checkpoint_factory, tmp_path):
    path = _copy(checkpoint_factory("llama"), tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "no_such_arch"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError):
        load(str(path))


@pytest.mark.model
def test_truncated_weights_are_corrupt(checkpoint_factory, tmp_path):
    path = _copy(checkpoint_factory("llama"), tmp_path / "m")
    shard = sorted(path.glob("*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CorruptCheckpointError):
        load(str(path))


@pytest.mark.model
def test_garbage_header_is_corrupt(checkpoint_factory, tmp_path):
    path = _copy(checkpoint_factory("llama"), tmp_path / "m")
    shard = sorted(path.glob("*.safetensors"))[0]
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CorruptCheckpointError):
        load(str(path))


@pytest.mark.model
def test_missing_tensor_is_corrupt(checkpoint_factory, tmp_path):
    path = _copy(checkpoint_factory("llama"), tmp_path / "m")
    shard = sorted(path.glob("*.safetensors"))[-1]
    tensors = mx.load(str(shard))
    tensors.pop(sorted(tensors)[0])
    mx.save_safetensors(str(shard), tensors)
    with pytest.raises(CorruptCheckpointError):
        load(str(path))


@pytest.mark.model
def test_memory_check_refuses_then_force_passes(checkpoint_factory, monkeypatch):
    path = str(checkpoint_factory("llama"))
    monkeypatch.setenv("MLXRUN_MEMORY_BUDGET", "100MB")
    with pytest.raises(InsufficientMemoryError) as exc:
        load(path)
    err = exc.value
    assert err.available == 100_000_000
    assert err.needed > err.available
    assert err.missing == err.needed - err.available
    assert "missing" in err.message and "--force" in err.hint
    model, _, _ = load(path, force=True)
    assert model(mx.array([PROMPT])).shape[-1] == 1024


@pytest.mark.model
def test_memory_check_counts_the_kv_cache(checkpoint_factory, monkeypatch):
    path = str(checkpoint_factory("llama"))
    monkeypatch.setenv("MLXRUN_MEMORY_BUDGET", "1GB")
    _, _, info = load(path, context=4096)
    assert info.context_length == 4096
    # 600k tokens x 1 KiB per token of KV no longer fit in 1 GB beside the runtime margin.
    with pytest.raises(InsufficientMemoryError) as exc:
        load(path, context=600_000)
    assert exc.value.needed > 600_000 * info.kv_bytes_per_token
