"""Bad input to `mlxrun convert`: one line with a hint, non-zero exit, nothing left at OUT."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest


def run_cli(
    *args: str, env: dict | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "mlxrun.cli", *args],
        capture_output=True, text=True, env=full_env, timeout=timeout,
    )  # fmt: skip


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("Error: ") and "Traceback" not in proc.stderr
    assert "(" in lines[0], "the error should carry a hint"
    for n in needles:
        assert n in lines[0], lines[0]


def assert_nothing_left(out: Path) -> None:
    assert not out.exists()
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    assert leftovers == []


@pytest.fixture
def src(checkpoint_factory, tmp_path) -> Path:
    """A private, writable copy of a two-shard llama checkpoint."""
    dst = tmp_path / "src"
    shutil.copytree(checkpoint_factory(arch="llama", num_shards=2), dst)
    return dst


def _convert(src: Path, out: Path, *extra: str, env: dict | None = None):
    return run_cli("convert", str(src), "-o", str(out), "--no-verify", "-q", *extra, env=env)


@pytest.mark.model
def test_success_prints_nothing_on_quiet_and_writes_model(src, tmp_path):
    out = tmp_path / "out"
    proc = _convert(src, out)
    assert proc.returncode == 0, proc.stderr
    assert (out / "config.json").exists() and (out / "model.safetensors.index.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.model
def test_missing_config(src, tmp_path):
    (src / "config.json").unlink()
    out = tmp_path / "out"
    assert_one_line_error(_convert(src, out), "config.json")
    assert_nothing_left(out)


@pytest.mark.model
def test_unsupported_model_type(src, tmp_path):
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "definitely_not_an_arch"
    (src / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    proc = _convert(src, out)
    assert_one_line_error(proc, "definitely_not_an_arch", "llama", "qwen2")
    assert_nothing_left(out)


@pytest.mark.model
def test_truncated_shard(src, tmp_path):
    shard = sorted(src.glob("model-*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    assert_one_line_error(_convert(src, out), shard.name, "truncated")
    assert_nothing_left(out)


@pytest.mark.model
def test_short_file_without_header(src, tmp_path):
    shard = sorted(src.glob("model-*.safetensors"))[0]
    shard.write_bytes(b"\x01\x02")
    out = tmp_path / "out"
    assert_one_line_error(_convert(src, out), shard.name)
    assert_nothing_left(out)


@pytest.mark.model
@pytest.mark.parametrize("kind", ["huge-length", "garbage-json"])
def test_corrupted_header(src, tmp_path, kind):
    shard = sorted(src.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    if kind == "huge-length":
        data[:8] = struct.pack("<Q", 1 << 40)
    else:
        (n,) = struct.unpack("<Q", data[:8])
        data[8 : 8 + n] = b"{" + b"\xff" * (n - 1)
    shard.write_bytes(bytes(data))
    out = tmp_path / "out"
    assert_one_line_error(_convert(src, out), shard.name, "header")
    assert_nothing_left(out)


@pytest.mark.model
def test_shard_named_in_index_missing(src, tmp_path):
    shard = sorted(src.glob("model-*.safetensors"))[1]
    shard.unlink()
    out = tmp_path / "out"
    assert_one_line_error(_convert(src, out), shard.name, "missing")
    assert_nothing_left(out)


@pytest.mark.pure
def test_offline_without_cache(tmp_path):
    out = tmp_path / "out"
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = run_cli("convert", "some-org/some-model", "-o", str(out), "-q", env=env)
    assert_one_line_error(proc, "some-org/some-model")
    assert_nothing_left(out)


@pytest.mark.model
def test_output_exists_needs_force(src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert_one_line_error(_convert(src, out), "not empty", "--force")
    assert (out / "keep.txt").read_text() == "precious"
    proc = _convert(src, out, "--force")
    assert proc.returncode == 0, proc.stderr
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


@pytest.mark.model
def test_traceback_only_with_debug(src, tmp_path):
    (src / "config.json").unlink()
    proc = _convert(src, tmp_path / "out", env={"MLXRUN_DEBUG": "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 256 KiB filesystem (tmpfs), so the write hits ENOSPC for real."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                         capture_output=True, text=True)  # fmt: skip
    assert res.returncode == 0, f"mounting a tmpfs needs root: {res.stderr}"
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


@pytest.mark.model
def test_disk_full_mid_write(src, tiny_disk):
    out = tiny_disk / "out"
    assert_one_line_error(_convert(src, out), "no space")
    assert_nothing_left(out)
    assert list(tiny_disk.iterdir()) == []


def _start_convert_blocked_on_calib(src: Path, out: Path, tmp_path: Path):
    """Start a conversion whose quality step blocks reading a FIFO, after the weights are written:
    a deterministic 'mid-convert' point to interrupt."""
    fifo = tmp_path / "calib.fifo"
    os.mkfifo(fifo)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlxrun.cli", "convert", str(src), "-o", str(out), "-q",
         "--calib", str(fifo)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline:
        partial = [p for p in out.parent.glob(f".{out.name}.mlxrun-partial-*")]
        if partial and (partial[0] / "model.safetensors.index.json").exists():
            return proc, partial[0]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("conversion never reached the quality step")


@pytest.mark.model
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_mid_convert_leaves_nothing(src, tmp_path, sig):
    out = tmp_path / "out"
    proc, partial = _start_convert_blocked_on_calib(src, out, tmp_path)
    t0 = time.monotonic()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - t0 < 2.5, "reading the calibration text must stop at once"
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert_nothing_left(out)


@pytest.mark.model
def test_sigkill_leftover_is_cleaned_by_next_run(src, tmp_path):
    out = tmp_path / "out"
    proc, partial = _start_convert_blocked_on_calib(src, out, tmp_path)
    proc.kill()
    proc.wait()
    assert not out.exists() and partial.exists()  # SIGKILL cannot be cleaned up after...
    done = _convert(src, out)  # ...but the next conversion removes the dead process's leftovers
    assert done.returncode == 0, done.stderr
    assert not partial.exists() and (out / "config.json").exists()


@pytest.mark.model
def test_missing_calib_fails_before_converting(src, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("convert", str(src), "-o", str(out), "--calib", str(tmp_path / "nope.txt"))
    assert_one_line_error(proc, "nope.txt")
    assert_nothing_left(out)
