"""The quality report of `mlxrun convert`: end-to-end metrics, per-tensor errors, calibration text,
and the model card / quality.json written next to the weights."""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
from pathlib import Path

import mlx.core as mx
import pytest

import mlxrun.convert.verify as verify_module
from mlxrun.convert.api import PARTIAL_TAG, convert_model
from mlxrun.convert.checkpoint import open_checkpoint
from mlxrun.convert.verify import (
    DEFAULT_MAX_TOKENS,
    QualityReport,
    read_calib,
    verify_conversion,
    write_report,
)
from mlxrun.errors import InvalidRequestError
from mlxrun.memory import BUDGET_ENV

INFO = {
    "source": "acme/tiny-llama",
    "architecture": "llama",
    "recipe": "4-bit g64",
    "bits_per_weight": 4.5,
    "size_bytes": 1_234_567,
    "num_tensors": 30,
}


@pytest.fixture(scope="module")
def source(checkpoint_factory) -> Path:
    return checkpoint_factory(arch="llama")


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory):
    """converted(bits=4), converted(quantize=False), …: each conversion of `source` made once."""
    root = tmp_path_factory.mktemp("converted")
    made: dict[tuple, Path] = {}

    def make(**options) -> Path:
        key = tuple(sorted(options.items()))
        if key not in made:
            out = root / f"m{len(made)}"
            convert_model(str(source), out, verify=False, quiet=True, **options)
            made[key] = out
        return made[key]

    return make


def _verify(src: Path, out: Path, **kw) -> QualityReport:
    return verify_conversion(src, out, quiet=kw.pop("quiet", True), **kw)


def _scales_count(out: Path) -> int:
    index = json.loads((out / "model.safetensors.index.json").read_text())
    return sum(name.endswith(".scales") for name in index["weight_map"])


# --- end to end ------------------------------------------------------------------------------


@pytest.mark.model
def test_end_to_end_more_bits_is_closer_to_the_source(source, converted):
    r8 = _verify(source, converted(bits=8), method="end-to-end", max_tokens=128)
    r2 = _verify(source, converted(bits=2), method="end-to-end", max_tokens=128)
    for r in (r8, r2):
        assert r.method == "end-to-end" and r.tokens == 128 and r.calib == "built-in"
        assert r.kl_divergence > 0
        assert r.ppl_ratio == pytest.approx(r.ppl_converted / r.ppl_source)
        assert r.ppl_source > 1 and r.ppl_converted > 1
        assert r.tensors is None and r.mean_rel_error is None and r.worst_tensors is None
        assert r.reason is None
    assert r8.kl_divergence < r2.kl_divergence / 10
    assert r8.top1_agreement > r2.top1_agreement
    assert r8.top1_agreement >= 0.9
    assert r8.ppl_ratio == pytest.approx(1.0, abs=0.01)


@pytest.mark.model
def test_float32_round_trip_is_lossless(source, converted):
    r = _verify(source, converted(quantize=False), method="end-to-end")
    assert r.tokens == DEFAULT_MAX_TOKENS  # the built-in text is longer than the default cap
    assert r.kl_divergence == pytest.approx(0.0, abs=1e-6)
    assert r.top1_agreement == 1.0
    assert r.ppl_ratio == pytest.approx(1.0, abs=1e-5)
    assert r.ppl_converted == pytest.approx(r.ppl_source, rel=1e-5)


@pytest.mark.model
@pytest.mark.parametrize(
    # bf16 runs at its own precision; MoE experts are stacked by sanitize (float32: MLX's CPU
    # backend has no bf16 gather_mm for unquantized experts).
    ("arch", "dtype"),
    [("gemma2", "bfloat16"), ("mixtral", "float32")],
)
def test_other_architectures_and_dtypes(arch, dtype, checkpoint_factory, tmp_path):
    src = checkpoint_factory(arch=arch, dtype=dtype)
    out = tmp_path / "q8"
    convert_model(str(src), out, bits=8, verify=False, quiet=True)
    e2e = _verify(src, out, method="end-to-end", max_tokens=48)
    assert e2e.kl_divergence < 0.01
    assert e2e.top1_agreement >= 0.75
    per = _verify(src, out, method="per-tensor")
    assert per.tensors == _scales_count(out)  # every quantized tensor found its source
    assert per.max_rel_error < (0.01 if dtype == "float32" else 0.02)  # bf16 scales round too


@pytest.mark.model
def test_auto_chooses_by_the_memory_budget(source, converted, monkeypatch):
    out = converted(bits=4)
    monkeypatch.setenv(BUDGET_ENV, "1TB")
    big = _verify(source, out, max_tokens=16)
    assert big.method == "end-to-end" and big.reason is None
    monkeypatch.setenv(BUDGET_ENV, "1MB")
    small = _verify(source, out, max_tokens=16)
    assert small.method == "per-tensor"
    assert "memory budget" in small.reason and "1.00 MB" in small.reason
    assert small.kl_divergence is None and small.tokens == 0


@pytest.mark.model
def test_auto_falls_back_to_per_tensor_when_the_source_cannot_run(source, tmp_path):
    """A checkpoint without tokenizer files still gets a report, and says why it is per-tensor."""
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in source.iterdir():
        if "token" not in f.name and not f.name.startswith(("vocab", "merges", "chat_template")):
            (bare / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "q4"
    convert_model(str(bare), out, bits=4, verify=False, quiet=True)
    r = _verify(bare, out)
    assert r.method == "per-tensor" and r.tensors == _scales_count(out)
    assert r.reason.startswith("the end-to-end run failed: ValueError")
    with pytest.raises(ValueError):
        _verify(bare, out, method="end-to-end")


# --- per tensor ------------------------------------------------------------------------------


@pytest.mark.model
def test_per_tensor_error_grows_as_bits_shrink(source, converted):
    reports = {b: _verify(source, converted(bits=b), method="per-tensor") for b in (8, 4, 2)}
    r8, r4, r2 = reports[8], reports[4], reports[2]
    assert r8.max_rel_error < 0.01
    assert r8.mean_rel_error < r4.mean_rel_error < r2.mean_rel_error
    assert r8.max_rel_error < r4.max_rel_error < r2.max_rel_error
    assert 0.1 < r2.mean_rel_error < 1.0  # 2-bit is poor, but not garbage
    for b, r in reports.items():
        out = converted(bits=b)
        assert r.method == "per-tensor" and r.reason == "requested"
        assert r.tensors == _scales_count(out)
        assert 0 < r.mean_rel_error <= r.max_rel_error
        assert len(r.worst_tensors) == 3 and len(set(r.worst_tensors)) == 3
        assert all(f"{n[: -len('.weight')]}.scales" in _index(out) for n in r.worst_tensors)
        assert r.kl_divergence is None and r.top1_agreement is None and r.ppl_ratio is None


def _index(out: Path) -> dict:
    return json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]


@pytest.mark.model
def test_per_tensor_honours_per_layer_bits(source, converted):
    """mixed_2_6 keeps embeddings and lm_head at 6 bits: they must never be the worst tensors."""
    out = converted(recipe="mixed_2_6")
    section = json.loads((out / "config.json").read_text())["quantization"]
    assert section["lm_head"]["bits"] == 6 and section["bits"] == 2
    mixed = _verify(source, out, method="per-tensor")
    uniform = _verify(source, converted(bits=2), method="per-tensor")
    assert mixed.tensors == uniform.tensors
    assert not {"lm_head.weight", "model.embed_tokens.weight"} & set(mixed.worst_tensors)
    assert mixed.mean_rel_error < uniform.mean_rel_error


@pytest.mark.model
def test_unquantized_conversion_compares_every_float_tensor(source, converted):
    out = converted(quantize=False)
    r = _verify(source, out, method="per-tensor")
    assert r.tensors == len(_index(out)) == len(open_checkpoint(source).tensors)
    assert r.max_rel_error == 0.0


@pytest.mark.model
def test_per_tensor_blocks_of_rows_add_up_to_whole_tensors(
    checkpoint_factory, tmp_path, monkeypatch
):
    """Huge tensors are compared a block of rows at a time; blocks must not change the result
    (mixtral's stacked experts are 3-D: rows span the expert axis too)."""
    src = checkpoint_factory(arch="mixtral")
    out = tmp_path / "q4"
    convert_model(str(src), out, bits=4, verify=False, quiet=True)
    whole = _verify(src, out, method="per-tensor")
    monkeypatch.setattr(verify_module, "_CHUNK_ELEMENTS", 1000)  # 7-8 rows of 128 per block
    blocks = _verify(src, out, method="per-tensor")
    assert blocks.worst_tensors == whole.worst_tensors
    assert blocks.mean_rel_error == pytest.approx(whole.mean_rel_error, rel=1e-5)
    assert blocks.max_rel_error == pytest.approx(whole.max_rel_error, rel=1e-5)


@pytest.mark.model
def test_per_tensor_memory_stays_bounded(checkpoint_factory, tmp_path):
    """One tensor pair resident at a time: the peak stays far below the source's size."""
    src = checkpoint_factory(arch="llama", num_layers=8, hidden_size=256, intermediate_size=512)
    out = tmp_path / "q4"
    convert_model(str(src), out, bits=4, verify=False, quiet=True)
    mx.clear_cache()
    mx.reset_peak_memory()
    r = _verify(src, out, method="per-tensor")
    assert r.tensors == _scales_count(out)
    assert mx.get_peak_memory() < open_checkpoint(src).total_bytes / 2


# --- calibration text ------------------------------------------------------------------------


@pytest.mark.model
def test_calib_file_is_used(source, converted, tmp_path):
    from mlx_lm.utils import load_tokenizer

    out = converted(bits=4)
    text = "def add(a, b):\n    return a + b\n\nThe sum of two and three is five.\n" * 6
    f = tmp_path / "mine.txt"
    f.write_text(text, encoding="utf-8")
    r = _verify(source, out, calib=str(f), method="end-to-end")
    assert r.calib == "mine.txt"
    assert r.tokens == len(load_tokenizer(source).encode(text)) < DEFAULT_MAX_TOKENS
    builtin = _verify(source, out, method="end-to-end", max_tokens=r.tokens)
    assert builtin.tokens == r.tokens and builtin.ppl_source != r.ppl_source


@pytest.mark.model
def test_calib_too_short_to_judge_is_refused(source, converted, tmp_path):
    """Three tokens can agree "100%": below MIN_CALIB_TOKENS the report would mean nothing."""
    from mlxrun.convert.verify import MIN_CALIB_TOKENS

    f = tmp_path / "short.txt"
    f.write_text("Hello there.", encoding="utf-8")
    with pytest.raises(InvalidRequestError) as info:
        _verify(source, converted(bits=4), calib=str(f), method="end-to-end")
    assert info.value.param == "calib" and f"at least {MIN_CALIB_TOKENS}" in info.value.message
    assert "short.txt" in info.value.message and "--calib" in info.value.hint


@pytest.mark.model
def test_chunked_log_probs_match_one_forward_pass(source):
    """The end-to-end run evaluates a batch of tokens at a time (so Ctrl-C is seen between
    steps); over a KV cache that gives the same log-probs as one pass over all tokens."""
    v = verify_module
    tokens = v._tokenize(source, v.read_calib(None)[0], 100)
    chunked = v._source_log_probs(source, tokens)  # (T, V) in batches of _STEP_TOKENS
    assert tokens.size > 3 * v._STEP_TOKENS and chunked.shape[0] == tokens.size
    from mlxrun.convert.quantize import load_lazy
    from mlxrun.models import build_model

    ckpt = open_checkpoint(source)
    model = build_model(ckpt.config)
    model.load_weights(list(load_lazy(ckpt, model).items()))
    logits = model(tokens[None])[0].astype(mx.float32)
    whole = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    assert mx.allclose(chunked, whole, atol=1e-4).item()


@pytest.mark.pure
def test_calib_text_can_come_through_a_pipe(tmp_path):
    fifo = tmp_path / "calib.fifo"
    os.mkfifo(fifo)
    text = "piped calibration text\n"
    writer = threading.Thread(target=fifo.write_text, args=(text,))
    writer.start()
    try:
        assert read_calib(fifo) == (text, "calib.fifo")
    finally:
        writer.join(timeout=10)


def _missing(tmp: Path) -> Path:
    return tmp / "nope.txt"


def _directory(tmp: Path) -> Path:
    return tmp


def _empty(tmp: Path) -> Path:
    (tmp / "empty.txt").write_bytes(b"")
    return tmp / "empty.txt"


def _blank(tmp: Path) -> Path:
    (tmp / "blank.txt").write_text(" \n\t\n")
    return tmp / "blank.txt"


def _latin1(tmp: Path) -> Path:
    (tmp / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me br\u00fbl\u00e9e".encode("latin-1"))
    return tmp / "latin1.txt"


def _binary(tmp: Path) -> Path:
    (tmp / "weights.bin").write_bytes(b"ok\x00\x00\x00\x01\x02")
    return tmp / "weights.bin"


@pytest.mark.model
@pytest.mark.parametrize("make", [_missing, _directory, _empty, _blank, _latin1, _binary])
def test_bad_calib_files_are_rejected(make, source, converted, tmp_path):
    path = make(tmp_path)
    with pytest.raises(InvalidRequestError) as info:
        _verify(source, converted(bits=4), calib=str(path))
    assert info.value.param == "calib"
    assert str(path) in info.value.message


@pytest.mark.model
def test_unknown_method_is_rejected(source, converted):
    with pytest.raises(InvalidRequestError) as info:
        _verify(source, converted(bits=4), method="fast")
    assert info.value.param == "method"


# --- progress line and report files ----------------------------------------------------------


@pytest.mark.model
def test_progress_line_unless_quiet(source, converted, capsys):
    out = converted(bits=4)
    r = _verify(source, out, method="end-to-end", max_tokens=32, quiet=False)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [r.summary()]
    assert err[0].startswith("Quality (end-to-end, 32 tokens): KL ")
    assert f"top-1 {r.top1_agreement:.1%}" in err[0]
    _verify(source, out, method="per-tensor", quiet=False)
    assert capsys.readouterr().err.startswith("Quality (per-tensor, ")
    _verify(source, out, method="per-tensor", quiet=True)
    assert capsys.readouterr().err == ""


def _front_matter(card: str) -> list[str]:
    assert card.startswith("---\n")
    return card.split("---\n")[1].splitlines()


@pytest.mark.model
def test_report_files_for_an_end_to_end_run(source, converted, tmp_path):
    r = _verify(source, converted(bits=4), method="end-to-end", max_tokens=32)
    write_report(tmp_path, INFO, r)
    data = json.loads((tmp_path / "quality.json").read_text())
    assert {k: data[k] for k in INFO} == INFO
    q = data["quality"]
    assert q["method"] == "end-to-end" and q["tokens"] == 32
    assert q["kl_divergence"] == r.kl_divergence and q["top1_agreement"] == r.top1_agreement
    assert q["ppl_ratio"] == r.ppl_ratio and q["mean_rel_error"] is None

    card = (tmp_path / "README.md").read_text()
    meta = _front_matter(card)
    assert "library_name: mlx" in meta and "- mlx" in meta and "- mlxrun" in meta
    assert 'base_model: "acme/tiny-llama"' in meta
    assert "end to end" in card and "32 tokens" in card and "built-in sample text" in card
    assert "4-bit g64" in card and "4.500" in card and "1.23 MB" in card and "`llama`" in card
    assert f"{r.top1_agreement:.1%}" in card and f"{r.ppl_ratio:.4f}" in card
    assert f'mlxrun chat "{tmp_path}"' in card
    assert f'mlx_lm.generate --model "{tmp_path}"' in card


@pytest.mark.model
def test_report_files_for_a_per_tensor_run(source, converted, tmp_path):
    r = _verify(source, converted(bits=4), method="per-tensor")
    info = {**INFO, "source": str(source)}  # a local path is no Hub base model
    write_report(tmp_path, info, r)
    q = json.loads((tmp_path / "quality.json").read_text())["quality"]
    assert q["method"] == "per-tensor" and q["worst_tensors"] == list(r.worst_tensors)
    assert q["tensors"] == r.tensors and q["kl_divergence"] is None
    card = (tmp_path / "README.md").read_text()
    assert not any(line.startswith("base_model") for line in _front_matter(card))
    assert "per tensor" in card and "(requested)" in card
    assert all(f"`{name}`" in card for name in r.worst_tensors)
    assert f"{r.mean_rel_error:.4f}" in card


@pytest.mark.pure
def test_report_without_quality_and_from_a_partial_dir(tmp_path):
    partial = tmp_path / f".tiny-4bit{PARTIAL_TAG}4242"
    partial.mkdir()
    write_report(partial, INFO, None)
    assert not (partial / "quality.json").exists()
    card = (partial / "README.md").read_text()
    assert "Not measured" in card
    assert "# tiny-4bit" in card and f'mlxrun chat "{tmp_path / "tiny-4bit"}"' in card
    assert PARTIAL_TAG not in card


@pytest.mark.model
def test_a_broken_conversion_shows_as_nan_and_null(source, converted, tmp_path):
    """NaN weights give NaN metrics (never a clamped 0), written to JSON as null."""
    broken = tmp_path / "broken"
    shutil.copytree(converted(quantize=False), broken)
    shard = broken / _index(broken)["model.norm.weight"]
    tensors = mx.load(str(shard))
    tensors["model.norm.weight"] = mx.full(tensors["model.norm.weight"].shape, math.nan)
    mx.save_safetensors(str(shard), tensors, metadata={"format": "mlx"})
    r = _verify(source, broken, method="end-to-end", max_tokens=16)
    assert math.isnan(r.kl_divergence) and math.isnan(r.ppl_converted)
    assert r.top1_agreement < 1.0 and "KL nan" in r.summary()
    write_report(tmp_path, INFO, r)
    text = (tmp_path / "quality.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    q = json.loads(text)["quality"]
    assert q["kl_divergence"] is None and q["ppl_converted"] is None
    assert q["ppl_source"] == r.ppl_source and q["top1_agreement"] == r.top1_agreement
    assert (
        "| KL divergence (source ‖ converted), nats/token | nan |"
        in (tmp_path / "README.md").read_text()
    )


# --- through convert_model -------------------------------------------------------------------


@pytest.mark.model
def test_convert_model_writes_the_report(source, tmp_path, monkeypatch):
    monkeypatch.setenv(BUDGET_ENV, "1TB")
    out = tmp_path / "tiny-q4"
    result = convert_model(str(source), out, bits=4, quiet=True)
    assert result.quality["method"] == "end-to-end"
    assert result.quality["tokens"] == DEFAULT_MAX_TOKENS
    data = json.loads((out / "quality.json").read_text())
    assert data["quality"] == json.loads(json.dumps(result.quality))
    assert data["recipe"] == result.recipe and data["size_bytes"] == result.size_bytes
    card = (out / "README.md").read_text()
    assert "end to end" in card and "# tiny-q4" in card and PARTIAL_TAG not in card
    assert f'mlxrun chat "{out}"' in card
