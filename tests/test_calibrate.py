"""Calibrated quantization (`--calibrate awq|gptq|dwq`): the recipe's bytes with other values,
readable by plain mlx-lm, computed one layer at a time in bounded memory."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlxrun.convert.calibrate as calibrate_module
from mlxrun.convert.api import convert_model
from mlxrun.convert.checkpoint import open_checkpoint
from mlxrun.convert.gptq import gptq_quantize, pack_codes

# Small enough to run in seconds on a busy CPU, large enough for statistics to mean something.
FAST = {"calib_samples": 8, "calib_seq_len": 64, "quiet": True}

pytestmark = pytest.mark.model


def _headers(out: Path) -> dict[str, tuple[str, tuple]]:
    """name -> (dtype, shape) over every shard, read from the safetensors headers."""
    found = {}
    for f in sorted(out.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        header.pop("__metadata__", None)
        found.update({k: (v["dtype"], tuple(v["shape"])) for k, v in header.items()})
    return found


def _files(out: Path) -> dict[str, int]:
    return {f.name: f.stat().st_size for f in out.glob("*.safetensors")}


@pytest.fixture(scope="module")
def src(checkpoint_factory) -> Path:
    return checkpoint_factory(arch="llama", dtype="bfloat16", num_shards=2)


@pytest.mark.parametrize(
    ("method", "recipe"), [("gptq", None), ("awq", None), ("dwq", None), ("gptq", "mixed_3_6")]
)
def test_calibration_changes_values_not_sizes(src, tmp_path, method, recipe):
    """Same files, sizes, tensor names, dtypes and shapes as the uncalibrated recipe; the config's
    quantization block is the same; plain mlx_lm.load reads it; the values differ."""
    from mlx_lm import load

    plain, cal = tmp_path / "plain", tmp_path / method
    convert_model(str(src), plain, recipe=recipe, verify=False, quiet=True)
    r = convert_model(str(src), cal, recipe=recipe, calibrate=method, verify=False, **FAST)
    assert _files(cal) == _files(plain)
    assert _headers(cal) == _headers(plain)
    qc = json.loads((cal / "config.json").read_text())["quantization"]
    assert qc == json.loads((plain / "config.json").read_text())["quantization"]
    assert not (cal / ".calibration").exists()  # the scratch folder is gone
    assert r.calibration["method"] == method and r.calibration["layers"] == 2

    a, b = mx.load(str(next(plain.glob("*.safetensors")))), {}
    for f in cal.glob("*.safetensors"):
        b.update(mx.load(str(f)))
    for f in plain.glob("*.safetensors"):
        a.update(mx.load(str(f)))
    changed = [k for k in a if not mx.array_equal(a[k], b[k]).item()]
    assert changed, "calibration left every tensor as plain rounding has it"
    assert all(".layers." in k for k in changed)  # embeddings/lm_head: plain rounding

    model, tok = load(str(cal))
    logits = model(mx.array([tok.encode("def main():\n    return 1")]))
    assert mx.all(mx.isfinite(logits)).item()


def test_pack_codes_is_mlx_layout_for_every_width():
    for bits in (2, 3, 4, 5, 6, 8):
        w = mx.random.normal((8, 128), key=mx.random.key(bits))
        wq, s, b = mx.quantize(w, group_size=64, bits=bits)
        g = w.reshape(8, 2, 64)
        q = mx.clip(mx.round((g - b[..., None]) / s[..., None]), 0, 2**bits - 1)
        assert mx.array_equal(pack_codes(np.array(q.reshape(8, 128)), bits), wq).item(), bits


def test_gptq_with_uncorrelated_inputs_is_plain_rounding():
    """With H = I no error can be compensated: GPTQ must reduce to mx.quantize exactly."""
    w = np.array(mx.random.normal((16, 128), key=mx.random.key(0)))
    wq, s, b = gptq_quantize(w, np.eye(128), 4, 64, mx.float32)
    ref = mx.quantize(mx.array(w), group_size=64, bits=4)
    for mine, theirs in zip((wq, s, b), ref, strict=True):
        assert mx.array_equal(mine, theirs).item()


def test_gptq_lowers_the_output_error_on_correlated_inputs():
    """The point of GPTQ: ‖XWᵀ − XŴᵀ‖ (not ‖W − Ŵ‖) drops versus plain rounding."""
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(128, 128)) * 0.3 + np.eye(128)
    x = rng.normal(size=(512, 128)) @ mix  # correlated features, as real activations are
    w = rng.normal(size=(32, 128)).astype(np.float32)
    wq, s, b = gptq_quantize(w, x.T @ x, 4, 64, mx.float32)
    plain = mx.quantize(mx.array(w), group_size=64, bits=4)

    def out_err(q) -> float:
        deq = np.array(mx.dequantize(*q, group_size=64, bits=4))
        return float(np.linalg.norm(x @ (w - deq).T))

    assert out_err((wq, s, b)) < 0.8 * out_err(plain)


def _kl(src: Path, out: Path, text: Path) -> float:
    from mlxrun.convert.verify import verify_conversion

    return verify_conversion(src, out, calib=text, quiet=True).kl_divergence


@pytest.mark.parametrize("method", ["gptq", "dwq", "awq"])
def test_calibrated_model_is_closer_to_the_source(checkpoint_factory, tmp_path, method):
    """On the text it was calibrated on, each method's KL to the source is below plain 3-bit's."""
    src = checkpoint_factory(arch="llama", dtype="float32", hidden_size=256, intermediate_size=512)
    text = tmp_path / "calib.txt"
    text.write_text((Path(calibrate_module.__file__).parent / "corpus" / "python.txt").read_text())
    plain, cal = tmp_path / "plain", tmp_path / "cal"
    convert_model(str(src), plain, bits=3, verify=False, quiet=True)
    convert_model(str(src), cal, bits=3, calibrate=method, calib=str(text), verify=False, **FAST)
    assert _kl(src, cal, text) < _kl(src, plain, text)


def _calibration_peak(src: Path, out: Path, method: str) -> int:
    mx.clear_cache()
    mx.reset_peak_memory()
    convert_model(str(src), out, calibrate=method, verify=False, **FAST)
    return mx.get_peak_memory()


@pytest.mark.parametrize("method", ["gptq", "dwq"])
def test_peak_memory_is_a_layer_not_the_model(checkpoint_factory, tmp_path, method):
    """One layer resident at a time: an 8-layer model peaks where a 2-layer one of the same width
    does (a whole-model pass would add six layers), and well below the source's size."""
    shape = {"arch": "llama", "hidden_size": 256, "intermediate_size": 512}
    deep, shallow = (checkpoint_factory(num_layers=n, **shape) for n in (8, 2))
    deep_total, shallow_total = (open_checkpoint(p).total_bytes for p in (deep, shallow))
    six_layers = deep_total - shallow_total
    peak_deep = _calibration_peak(deep, tmp_path / "deep", method)
    peak_shallow = _calibration_peak(shallow, tmp_path / "shallow", method)
    assert peak_deep < peak_shallow + six_layers / 4
    assert peak_deep < 0.75 * deep_total


def test_activations_spill_to_disk_past_the_budget(src, tmp_path, monkeypatch):
    """With no activation budget every batch goes through scratch files; same result."""
    kept = convert_model(str(src), tmp_path / "mem", calibrate="dwq", verify=False, **FAST)
    seen = []
    real_append = calibrate_module.ActivationStore.append

    def spy(self, a):
        real_append(self, a)
        seen.append(isinstance(self.items[-1], Path) and self.items[-1].is_file())

    monkeypatch.setattr(calibrate_module, "ACTIVATION_BUDGET", 0)
    monkeypatch.setattr(calibrate_module.ActivationStore, "append", spy)
    spilled = convert_model(str(src), tmp_path / "disk", calibrate="dwq", verify=False, **FAST)
    assert kept.calibration["spilled_batches"] == 0
    assert spilled.calibration["spilled_batches"] > 0 and seen and all(seen)
    for name in _files(tmp_path / "mem"):
        assert (tmp_path / "mem" / name).read_bytes() == (tmp_path / "disk" / name).read_bytes()


def test_calibration_follows_the_fit_planner(src, tmp_path):
    """With --fit, the planner picks the recipe and calibration keeps its bytes."""
    plain = convert_model(str(src), tmp_path / "plain", fit="1TB", verify=False, quiet=True)
    cal = convert_model(str(src), tmp_path / "cal", fit="1TB", calibrate="gptq", verify=False,
                        **FAST)  # fmt: skip
    assert cal.recipe == plain.recipe and cal.size_bytes == plain.size_bytes
    assert _headers(tmp_path / "cal") == _headers(tmp_path / "plain")
