"""`mlxrun convert` from the command line: --plan, --fit, progress on a TTY, the store default."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pexpect
import pytest
from test_convert_errors import assert_one_line_error, run_cli


@pytest.mark.pure
def test_help_is_fast_and_lists_commands():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for cmd in ("convert", "list", "show", "rm", "pull"):
        assert cmd in proc.stdout
    assert run_cli("--version").stdout.strip().endswith("0.1.0")
    # Heavy libraries load inside commands only, so --help stays instant.
    code = ("import sys; from click.testing import CliRunner; from mlxrun.cli import main; "
            "CliRunner().invoke(main, ['--help']); "
            "print(sorted(m for m in ('mlx', 'torch', 'transformers', 'mlx_lm') if m in sys.modules))")  # fmt: skip
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert probe.stdout.strip() == "[]", probe.stdout + probe.stderr


@pytest.mark.model
def test_plan_prints_table_and_writes_nothing(tiny_llama, tmp_path):
    proc = run_cli(
        "convert", str(tiny_llama), "--plan", "--bits", "4", env={"MLXRUN_HOME": str(tmp_path)}
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for word in ("embeddings", "attention", "mlp", "KV cache", "total"):
        assert word.lower() in out.lower(), out
    assert "4-bit" in out
    assert not (tmp_path / "models").exists()


@pytest.mark.model
def test_fit_picks_by_budget(tiny_llama, tmp_path):
    """A roomy budget gets 8-bit; a budget just above the 4-bit plan's total gets a <=4-bit recipe."""
    big = run_cli("convert", str(tiny_llama), "--plan", "--fit", "64GB", "--context", "256")
    assert big.returncode == 0, big.stderr
    assert "8-bit" in big.stdout.splitlines()[0]
    from mlxrun.convert.plan import estimate
    from mlxrun.convert.recipes import get_recipe
    from mlxrun.models import build_model

    config = json.loads((tiny_llama / "config.json").read_text())
    model = build_model(config)
    q4, q8 = (estimate(model, config, get_recipe(f"q{b}"), 256, budget_bytes=1).total_bytes
              for b in (4, 8))  # fmt: skip
    mid = run_cli("convert", str(tiny_llama), "--plan", "--fit", f"{(q4 + q8) // 2}B",
                  "--context", "256")  # fmt: skip
    assert mid.returncode == 0, mid.stderr
    first = mid.stdout.splitlines()[0]
    assert "8-bit" not in first and "fits" in mid.stdout


@pytest.mark.model
def test_fit_too_small_says_how_much_is_missing(tiny_llama, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("convert", str(tiny_llama), "-o", str(out), "--fit", "10MB", "--no-verify")
    assert_one_line_error(proc, "more than available")
    assert not out.exists()


@pytest.mark.model
def test_fit_auto_uses_budget_and_records_recipe(tiny_llama, tmp_path):
    out = tmp_path / "out"
    env = {"MLXRUN_MEMORY_BUDGET": "64GB"}
    proc = run_cli("convert", str(tiny_llama), "-o", str(out), "--fit", "auto", "--context", "512",
                   "--no-verify", "-q", env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 8


@pytest.mark.model
def test_default_output_goes_to_store(tiny_llama, tmp_path):
    home = tmp_path / "home"
    proc = run_cli("convert", str(tiny_llama), "--no-verify", "-q", env={"MLXRUN_HOME": str(home)})
    assert proc.returncode == 0, proc.stderr
    models = list((home / "models").iterdir())
    assert len(models) == 1 and models[0].name.endswith("-4bit")
    listing = run_cli("list", env={"MLXRUN_HOME": str(home)})
    assert models[0].name in listing.stdout


@pytest.mark.model
def test_progress_bar_on_tty_and_quiet(tiny_llama, tmp_path):
    env = {**os.environ, "COLUMNS": "120"}
    args = ["-m", "mlxrun.cli", "convert", str(tiny_llama), "--no-verify"]
    child = pexpect.spawn(sys.executable, [*args, "-o", str(tmp_path / "a")], env=env,
                          encoding="utf-8", timeout=120)  # fmt: skip
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    assert "Converting" in child.before and "tensors" in child.before and "B/s" in child.before
    # The bar counts what the summary counts: output tensors (a quantized weight's scales and
    # biases included), not source tensors.
    done, total = re.findall(r"(\d+)/(\d+) tensors", child.before)[-1]
    summary = re.search(r"Done in .*?: (\d+) tensors, ", child.before)
    assert summary and done == total == summary.group(1), child.before
    index = json.loads((tmp_path / "a" / "model.safetensors.index.json").read_text())
    assert int(total) == len(index["weight_map"])

    child = pexpect.spawn(sys.executable, [*args, "-q", "-o", str(tmp_path / "b")], env=env,
                          encoding="utf-8", timeout=120)  # fmt: skip
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0 and child.before.strip() == ""


@pytest.mark.model
def test_convert_from_hub_repo_and_unknown_repo(tiny_llama, tmp_path):
    """A repo id is downloaded with huggingface_hub from a local Hub, then converted; an unknown repo
    is a one-line error that names it."""
    from hubserver import HubServer

    (tmp_path / "repos" / "acme").mkdir(parents=True)
    (tmp_path / "repos" / "acme" / "tiny").symlink_to(tiny_llama)
    (tmp_path / "extra").mkdir()
    with HubServer(tmp_path / "repos") as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0"}
        out = tmp_path / "out"
        ok = run_cli("convert", "acme/tiny", "-o", str(out), "--no-verify", "-q", env=env)
        assert ok.returncode == 0, ok.stderr
        assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 4
        assert json.loads((out / "mlxrun.json").read_text())["source"] == "acme/tiny"
        missing = run_cli("convert", "acme/nope", "-o", str(tmp_path / "o2"), "-q", env=env)
        assert_one_line_error(missing, "acme/nope")
        assert not (tmp_path / "o2").exists()
    offline = run_cli("convert", "acme/tiny", "-o", str(tmp_path / "o3"), "--no-verify", "-q",
                      env={**env, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert offline.returncode == 0, offline.stderr  # served from the HF cache, no network
