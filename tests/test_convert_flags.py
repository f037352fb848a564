"""`mlxrun convert` says what it does: conflicting flags are refused, a context past the model's
maximum is said out loud, the quality check shows itself, and one size and one tensor count are
reported everywhere (summary, model card, `mlxrun list`, `mlxrun show`)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_convert_errors import assert_one_line_error, run_cli

from mlxrun.cli import main
from mlxrun.errors import format_size

MAX_CONTEXT = 2048  # the fixtures' max_position_embeddings


def _invoke(*args: str):
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stderr


def _one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), stderr
    assert "(" in lines[0], "the error should carry a hint: " + lines[0]
    return lines[0]


@pytest.mark.model
@pytest.mark.parametrize(
    "flags",
    [
        ["--no-quantize", "--bits", "3"],
        ["--no-quantize", "--group-size", "32"],
        ["--no-quantize", "--recipe", "mixed_4_6"],
        ["--no-quantize", "--fit", "16GB"],
        ["--recipe", "mixed_4_6", "--bits", "3"],
        ["--fit", "16GB", "--bits", "3"],
        ["--fit", "16GB", "--recipe", "mixed_4_6"],
        ["--calib", "notes.txt", "--no-verify"],
    ],
    ids=lambda f: " ".join(x for x in f if x.startswith("--")),
)
def test_conflicting_flags_are_refused_naming_both(tiny_llama, tmp_path, flags):
    out = tmp_path / "out"
    (tmp_path / "notes.txt").write_text("some text\n" * 50)
    flags = [str(tmp_path / f) if f == "notes.txt" else f for f in flags]
    code, err = _invoke("convert", str(tiny_llama), "-o", str(out), *flags)
    line = _one_error_line(err)
    assert code != 0
    named = [f for f in flags if f.startswith("--")]
    for flag in named:
        assert flag in line, line
    assert "cannot be used together" in line
    assert not out.exists() and list(tmp_path.iterdir()) == [tmp_path / "notes.txt"]


@pytest.mark.pure
def test_pull_refuses_conflicting_flags_before_downloading(tmp_path):
    code, err = _invoke("pull", "acme/tiny", "--recipe", "mixed_4_6", "--bits", "3")
    line = _one_error_line(err)
    assert code != 0 and "--recipe and --bits cannot be used together" in line, line


@pytest.mark.model
@pytest.mark.parametrize(
    "flags",
    [["-o", "OUT"], ["--no-quantize"], ["--calib", "notes.txt"], ["--no-verify"], ["--force"],
     ["--dtype", "float16"]],
    ids=lambda f: f[0],
)  # fmt: skip
def test_plan_refuses_flags_it_would_ignore(tiny_llama, tmp_path, flags):
    (tmp_path / "notes.txt").write_text("some text\n" * 50)
    flags = [str(tmp_path / f) if f in ("notes.txt", "OUT") else f for f in flags]
    code, err = _invoke("convert", str(tiny_llama), "--plan", *flags)
    line = _one_error_line(err)
    assert code != 0 and "--plan" in line and flags[0].split("/")[0] in line, line


@pytest.mark.model
def test_compatible_flags_still_work(tiny_llama, tmp_path):
    """--recipe with --group-size, --fit with --group-size: nothing is overridden, so no error."""
    code, err = _invoke("convert", str(tiny_llama), "--plan", "--recipe", "mixed_4_6",
                        "--group-size", "32")  # fmt: skip
    assert code == 0, err
    out = tmp_path / "out"
    code, err = _invoke("convert", str(tiny_llama), "-o", str(out), "--recipe", "mixed_4_6",
                        "--group-size", "32", "--no-verify", "-q")  # fmt: skip
    assert code == 0, err
    quant = json.loads((out / "config.json").read_text())["quantization"]
    assert quant["group_size"] == 32 and any(
        isinstance(v, dict) and v.get("bits") == 6 for v in quant.values()
    )


# --- context past the model's maximum ---------------------------------------------------------


@pytest.mark.model
def test_context_without_fit_is_refused(tiny_llama, tmp_path):
    """Only the --fit planner reads --context: a plain conversion would drop it silently."""
    out = tmp_path / "out"
    code, err = _invoke("convert", str(tiny_llama), "-o", str(out), "--context", "4096")
    line = _one_error_line(err)
    assert code != 0 and "--context" in line and "--fit" in line and not out.exists()


@pytest.mark.model
def test_plan_context_beyond_the_model_is_clamped_with_a_warning(tiny_llama):
    code, err = _invoke("convert", str(tiny_llama), "--plan", "--context", "100000")
    assert code == 0
    assert f"--context 100000 is beyond the model's maximum of {MAX_CONTEXT} tokens" in err
    proc = run_cli("convert", str(tiny_llama), "--plan", "--context", "100000")
    assert f"context {MAX_CONTEXT} tokens" in proc.stdout.splitlines()[0], proc.stdout


@pytest.mark.model
def test_default_plan_context_stays_within_the_model(tiny_llama):
    """The planner's default (8192) on a 2048-token model plans for 2048, silently."""
    proc = run_cli("convert", str(tiny_llama), "--plan")
    assert proc.returncode == 0, proc.stderr
    assert f"context {MAX_CONTEXT} tokens" in proc.stdout.splitlines()[0]
    assert "Warning" not in proc.stderr


@pytest.mark.model
def test_fit_context_beyond_the_model_warns(tiny_llama):
    proc = run_cli("convert", str(tiny_llama), "--plan", "--fit", "64GB", "--context", "100000")
    assert proc.returncode == 0, proc.stderr
    assert "beyond the model's maximum" in proc.stderr
    assert f"context {MAX_CONTEXT} tokens" in proc.stdout.splitlines()[0]


@pytest.mark.model
def test_load_warns_about_context_beyond_the_model(tiny_llama, caplog):
    from mlxrun.loader import load

    with caplog.at_level(logging.WARNING, logger="mlxrun.loader"):
        _, _, info = load(tiny_llama, context=100_000)
    assert info.context_length == 100_000  # kept: rope scaling can stretch a model
    assert f"beyond the model's maximum of {MAX_CONTEXT}" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mlxrun.loader"):
        load(tiny_llama, context=MAX_CONTEXT)
    assert caplog.text == ""


# --- calibration sample -----------------------------------------------------------------------


@pytest.mark.model
def test_short_calib_is_refused_before_converting(tiny_llama, tmp_path):
    out = tmp_path / "out"
    short = tmp_path / "short.txt"
    short.write_text("Hello there.")
    proc = run_cli("convert", str(tiny_llama), "-o", str(out), "--calib", str(short))
    assert_one_line_error(proc, "short.txt", "token", "at least")
    assert "Quality" not in proc.stderr and not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["short.txt"]


# --- the quality check, sizes and tensor counts ----------------------------------------------


@pytest.fixture(scope="module")
def converted(tiny_llama, tmp_path_factory):
    """One conversion with the quality check into a store: (home, model dir, stderr)."""
    home = tmp_path_factory.mktemp("home")
    out = home / "models" / "tiny-4bit"
    proc = run_cli("convert", str(tiny_llama), "-o", str(out), env={"MLXRUN_HOME": str(home)})
    assert proc.returncode == 0, proc.stderr
    return home, out, proc.stderr


@pytest.mark.model
def test_quality_check_announces_itself_and_is_timed(converted):
    _, _, err = converted
    lines = err.splitlines()
    check = next(i for i, ln in enumerate(lines) if ln.startswith("Checking quality"))
    assert "--no-verify skips" in lines[check]
    assert lines[check + 1].startswith("Quality (end-to-end, ")
    done = lines[-1]
    m = re.search(r"Done in ([\d.]+)s \(weights ([\d.]+)s, quality check ([\d.]+)s", done)
    assert m, done
    total, weights, check_s = map(float, m.groups())
    assert check_s > 0 and weights + check_s <= total + 0.1
    assert "--no-verify skips it" in done


@pytest.mark.model
def test_one_size_and_one_tensor_count_everywhere(converted):
    home, out, err = converted
    from mlxrun.store import weight_bytes

    size = format_size(weight_bytes(out))  # the bytes on disk, in human units
    assert not size.startswith("0.")  # human units: never "0.00 GB" for a small model
    done = err.splitlines()[-1]
    assert f" {size}, " in done and " GB" not in done, done
    card = (out / "README.md").read_text()
    assert f"| Size | {size} |" in card
    env = {"MLXRUN_HOME": str(home)}
    listed = run_cli("list", env=env).stdout.splitlines()[1].split()
    assert " ".join(listed[2:4]) == size, listed
    shown = run_cli("show", "tiny-4bit", env=env).stdout
    assert re.search(rf"^size_bytes\s+{re.escape(size)} \(", shown, re.M), shown

    index = json.loads((out / "model.safetensors.index.json").read_text())
    count = len(index["weight_map"])
    assert f": {count} tensors, " in done
    assert f"| Tensors | {count} |" in card
    assert re.search(rf"^tensors\s+{count}$", shown, re.M), shown


@pytest.mark.model
def test_show_prints_the_quality_metrics(converted):
    home, out, _ = converted
    q = json.loads((out / "quality.json").read_text())["quality"]
    shown = run_cli("show", "tiny-4bit", env={"MLXRUN_HOME": str(home)}).stdout
    assert re.search(r"^quality\s+Quality \(end-to-end, \d+ tokens\): KL ", shown, re.M), shown
    assert f"{q['top1_agreement']:.1%}" in shown and f"{q['ppl_ratio']:.4f}" in shown
    assert re.search(r"^quality\.calib\s+built-in$", shown, re.M)
    data = json.loads(run_cli("show", "tiny-4bit", "--json", env={"MLXRUN_HOME": str(home)}).stdout)
    assert data["quality"] == q and data["tensors"] > 0


@pytest.mark.model
def test_show_says_when_quality_was_not_measured(tiny_llama, tmp_path):
    home = tmp_path / "home"
    env = {"MLXRUN_HOME": str(home)}
    out = Path(home) / "models" / "plain"
    assert run_cli("convert", str(tiny_llama), "-o", str(out), "--no-verify", "-q",
                   env=env).returncode == 0  # fmt: skip
    shown = run_cli("show", "plain", env=env).stdout
    assert re.search(r"^quality\s+not measured$", shown, re.M), shown
