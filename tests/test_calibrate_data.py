"""The calibration set: a built-in code corpus shipped with the package, `--calib FILE|DIR` to
override, named in the model card, and never overlapping the held-out quality-check text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlxrun.convert.api import convert_model
from mlxrun.convert.calib import SAMPLE_TEXT
from mlxrun.convert.calib_data import BUILTIN_LABEL, CORPUS_DIR, calib_tokens, read_calib_set
from mlxrun.errors import InvalidRequestError

FAST = {"calib_samples": 4, "calib_seq_len": 32, "quiet": True}

pytestmark = pytest.mark.model


def _ngrams(text: str, n: int = 8) -> set[tuple[str, ...]]:
    # Runs of 8 words: shared content shows up, a common `from pathlib import Path` does not.
    words = text.split()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def test_builtin_corpus_is_small_mixed_code_and_chat():
    files = sorted(CORPUS_DIR.glob("*.txt"))
    total = sum(f.stat().st_size for f in files)
    assert 8_000 < total < 200_000  # shipped in the wheel: small
    text = "\n".join(f.read_text() for f in files)
    markers = {
        "python": "def ", "javascript": "=> ", "rust": "fn ", "go": "func ", "c": "#include",
        "sql": "SELECT", "shell": "#!/usr/bin/env bash", "chat turns": "<|im_start|>assistant",
    }  # fmt: skip
    missing = [lang for lang, m in markers.items() if m not in text]
    assert not missing, missing


def test_corpus_ships_with_the_package():
    import tomllib

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    data = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-data"]
    assert "corpus/*.txt" in data["mlxrun.convert"]
    assert CORPUS_DIR.parent.name == "convert"


def test_held_out_text_does_not_overlap_the_corpus():
    """The KL and perplexity a card reports are measured on text calibration never saw."""
    corpus = _ngrams("\n".join(f.read_text() for f in CORPUS_DIR.glob("*.txt")))
    assert corpus and not corpus & _ngrams(SAMPLE_TEXT)


def test_calib_dir_reads_every_text_file(tmp_path):
    (tmp_path / "a.py").write_text("def f():\n    return 1\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.rs").write_text("fn main() {}\n")
    (tmp_path / ".hidden.txt").write_text("skipped")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\x00")
    cs = read_calib_set(tmp_path)
    assert cs.label == str(tmp_path) and len(cs.documents) == 2


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda p: p / "missing", "does not exist"),
        (lambda p: (p / "bin.txt").write_bytes(b"ab\x00cd") and p / "bin.txt", "binary"),
        (lambda p: (p / "e").mkdir() or p / "e", "holds no text"),
    ],
)
def test_bad_calibration_data_is_refused_before_converting(tiny_llama, tmp_path, make, needle):
    out = tmp_path / "out"
    with pytest.raises(InvalidRequestError, match=needle) as e:
        convert_model(str(tiny_llama), out, calibrate="gptq", calib=str(make(tmp_path)), **FAST)
    assert e.value.param == "calib"
    assert not out.exists()


def test_too_little_calibration_text_is_refused(tiny_llama, tmp_path):
    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(tiny_llama)
    (tmp_path / "short.txt").write_text("x = 1")
    with pytest.raises(InvalidRequestError, match="calibration needs at least"):
        calib_tokens(tok, read_calib_set(tmp_path / "short.txt"))


def test_card_names_the_calibration_set(tiny_llama, tmp_path):
    builtin = convert_model(str(tiny_llama), tmp_path / "a", calibrate="gptq", **FAST)
    assert builtin.calibration["data"] == BUILTIN_LABEL
    card = (tmp_path / "a" / "README.md").read_text()
    assert f"gptq on {builtin.calibration['tokens']} tokens" in card and BUILTIN_LABEL in card
    # The quality check stays on its held-out sample, not on the calibration text.
    assert (
        json.loads((tmp_path / "a" / "quality.json").read_text())["quality"]["calib"] == "built-in"
    )

    mine = tmp_path / "mine.py"
    mine.write_text((CORPUS_DIR / "python.txt").read_text())
    own = convert_model(str(tiny_llama), tmp_path / "b", calibrate="gptq", calib=str(mine), **FAST)
    assert own.calibration["data"] == str(mine)
    assert str(mine) in (tmp_path / "b" / "README.md").read_text()
