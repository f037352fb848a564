"""`convert_model` on fixture checkpoints: mlx-lm interop, bit widths, recipes, layout."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from fixtures.builder import ARCHS
from mlxrun.convert.api import convert_model

pytestmark = pytest.mark.model


def _load_all(path: Path) -> dict[str, mx.array]:
    out: dict[str, mx.array] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(mx.load(str(f)))
    return out


def _mlx_lm_convert(src: Path, dst: Path, **kw) -> None:
    from mlx_lm.convert import convert

    convert(str(src), str(dst), **kw)


def _with_mode(q: dict) -> dict:
    return {k: ({"mode": "affine", **v} if isinstance(v, dict) else v) for k, v in q.items()}


def _greedy_ids(model, prompt: list[int], n: int = 12) -> list[int]:
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    x = mx.array([prompt])
    out = []
    for _ in range(n):
        logits = model(x, cache=cache)[:, -1, :]
        tok = int(mx.argmax(logits, axis=-1).item())
        out.append(tok)
        x = mx.array([[tok]])
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_byte_identical_to_mlx_lm_convert(arch, checkpoint_factory, tmp_path):
    """Same tensors, dtypes, values and config as mlx_lm.convert, for every architecture.

    On the 4.x config layout mlx-lm reads; 5.x configs get the legacy keys added (test_hub_configs).
    """
    src = checkpoint_factory(arch=arch, dtype="bfloat16", config_format="transformers4")
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    convert_model(str(src), ours, verify=False, quiet=True)
    _mlx_lm_convert(src, theirs, quantize=True, q_bits=4, q_group_size=64)

    a, b = _load_all(ours), _load_all(theirs)
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert mx.array_equal(a[k], b[k]).item(), k
    ca = json.loads((ours / "config.json").read_text())
    cb = json.loads((theirs / "config.json").read_text())
    # mlx-lm copies an architecture's own override verbatim (without "mode"); affine is implied.
    assert _with_mode(ca["quantization"]) == _with_mode(cb["quantization"])
    assert ca["quantization_config"] == ca["quantization"]
    # A 4.x config needs no normalizing: it is written back as it came, plus the quantization.
    source = json.loads((src / "config.json").read_text())
    assert {k: v for k, v in ca.items() if not k.startswith("quantization")} == source
    index = json.loads((ours / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(a)


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_mlx_lm_load_greedy_matches(arch, checkpoint_factory, tmp_path):
    """Our output through mlx_lm.load generates the same greedy tokens as mlx_lm.convert's output."""
    from mlx_lm import load

    src = checkpoint_factory(arch=arch, config_format="transformers4")  # mlx_lm.convert reads 4.x
    convert_model(str(src), tmp_path / "ours", bits=8, verify=False, quiet=True)
    _mlx_lm_convert(src, tmp_path / "theirs", quantize=True, q_bits=8, q_group_size=64)
    prompt = [1, 17, 42, 99, 5, 8]
    m1, _ = load(str(tmp_path / "ours"))
    m2, _ = load(str(tmp_path / "theirs"))
    assert _greedy_ids(m1, prompt) == _greedy_ids(m2, prompt)


@pytest.mark.parametrize(
    "bits,group_size", [(2, 64), (3, 64), (4, 32), (4, 128), (5, 64), (6, 64), (8, 64)]
)
def test_bit_widths_and_group_sizes(bits, group_size, checkpoint_factory, tmp_path):
    from mlx_lm import load

    src = checkpoint_factory(arch="llama")
    out = tmp_path / "out"
    res = convert_model(str(src), out, bits=bits, group_size=group_size, verify=False, quiet=True)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"] == {"group_size": group_size, "bits": bits, "mode": "affine"}
    model, _ = load(str(out))
    qlayers = [m for _, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)]
    assert qlayers and all(m.bits == bits and m.group_size == group_size for m in qlayers)
    # Packed weights cost `bits` per weight plus a float32 scale and bias per group (float32 source).
    assert abs(res.bits_per_weight - (bits + 64 / group_size)) < 0.3


def test_quantization_error_shrinks_with_bits(checkpoint_factory, tmp_path):
    from mlx_lm import load

    src = checkpoint_factory(arch="llama")
    ref, _ = load(str(src))
    x = mx.array([[3, 14, 15, 92, 65, 35, 89, 79]])
    want = ref(x)
    errs = []
    for bits in (2, 4, 8):
        convert_model(str(src), tmp_path / f"q{bits}", bits=bits, verify=False, quiet=True)
        model, _ = load(str(tmp_path / f"q{bits}"))
        errs.append(mx.abs(model(x) - want).mean().item())
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 0.05 * mx.abs(want).mean().item()


def test_mixed_recipe_overrides(checkpoint_factory, tmp_path):
    from mlx_lm import load

    src = checkpoint_factory(arch="llama", num_layers=4)
    out = tmp_path / "mixed"
    convert_model(str(src), out, recipe="mixed_4_6", verify=False, quiet=True)
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert q["bits"] == 4 and q["group_size"] == 64
    six = {k for k, v in q.items() if isinstance(v, dict) and v["bits"] == 6}
    assert "lm_head" in six and "model.embed_tokens" in six
    # With 4 layers the sensitive ones are the last eighth (layer 3) and every third (layer 2).
    for i in (2, 3):
        assert {f"model.layers.{i}.self_attn.v_proj", f"model.layers.{i}.mlp.down_proj"} <= six
    assert not any(k.startswith(("model.layers.0.", "model.layers.1.")) for k in six)
    assert not any("q_proj" in k or "gate_proj" in k for k in six)
    model, _ = load(str(out))
    bits = {p: m.bits for p, m in model.named_modules() if hasattr(m, "bits")}
    assert bits["lm_head"] == 6 and bits["model.layers.0.self_attn.q_proj"] == 4
    assert bits["model.layers.3.self_attn.v_proj"] == 6
    assert bits["model.layers.0.self_attn.v_proj"] == 4


def test_no_quantize_with_dtype(checkpoint_factory, tmp_path):
    from mlx_lm import load

    src = checkpoint_factory(arch="qwen2")
    out = tmp_path / "bf16"
    convert_model(str(src), out, quantize=False, dtype="bfloat16", verify=False, quiet=True)
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization" not in cfg
    weights = _load_all(out)
    assert weights and all(v.dtype == mx.bfloat16 for v in weights.values())
    model, _ = load(str(out))
    assert not any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())


def test_sharded_output_and_sidecars(checkpoint_factory, tmp_path):
    from mlx_lm import load

    src = checkpoint_factory(arch="llama", tokenizer="spm")
    out = tmp_path / "sharded"
    convert_model(str(src), out, verify=False, quiet=True, max_shard_bytes=200_000)
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [s.name for s in shards]
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in _load_all(out).values())
    for name in ("tokenizer.model", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    assert (out / "chat_template.jinja").exists() == (src / "chat_template.jinja").exists()
    model, tok = load(str(out))
    assert tok.encode("hello world")
    assert _greedy_ids(model, [1, 2, 3], n=3)


def test_mlx_lm_output_reads_as_mlx_model(checkpoint_factory, tmp_path):
    """An mlx_lm.convert output is recognised as MLX (not re-converted) and described by the store."""
    from mlxrun.convert.checkpoint import open_checkpoint
    from mlxrun.errors import UnsupportedModelError

    src = checkpoint_factory(arch="mistral")
    theirs = tmp_path / "theirs"
    _mlx_lm_convert(src, theirs, quantize=True, q_bits=4, q_group_size=64)
    assert open_checkpoint(theirs).is_mlx
    with pytest.raises(UnsupportedModelError):
        convert_model(str(theirs), tmp_path / "again", verify=False, quiet=True)
    assert not (tmp_path / "again").exists()


def test_total_parameters_in_index(checkpoint_factory, tmp_path):
    from mlx_lm import load

    src = checkpoint_factory(arch="phi3")
    out = tmp_path / "p"
    convert_model(str(src), out, verify=False, quiet=True)
    ref, _ = load(str(src))
    n = sum(v.size for _, v in tree_flatten(ref.parameters()))
    assert (
        json.loads((out / "model.safetensors.index.json").read_text())["metadata"][
            "total_parameters"
        ]
        == n
    )
