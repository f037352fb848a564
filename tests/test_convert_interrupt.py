"""Ctrl-C and SIGTERM stop `mlxrun convert` within about a second in every long phase.

A real model big enough to keep MLX busy for tens of seconds is too slow to build here, so the
conversion runs as usual on the tiny checkpoint, with one MLX evaluation made long: when the
phase under test starts, it first evaluates a large matmul chain, minutes of C++ during which
Python cannot run a signal handler on the main thread. That is exactly the state a real model is
in during a long quantization step or the quality check's forward pass.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_convert_errors import assert_nothing_left

pytestmark = pytest.mark.model

# Runs `mlxrun convert` with a long MLX evaluation at the start of one phase.
_DRIVER = r"""
import sys
import mlx.core as mx
from mlxrun.convert import quantize, verify

def burn():
    a = mx.random.normal((1024, 1024))
    mx.eval(a)
    b = a
    for _ in range(3000):
        b = (b @ a) * 1e-3
    print("BURNING", file=sys.stderr, flush=True)
    mx.eval(b)  # one call into C++ that lasts minutes on a CPU

def on_call(n, fn):  # burn before the n-th call of fn
    calls = [0]
    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            burn()
        return fn(*args, **kwargs)
    return wrapped

phase = sys.argv.pop(1)
if phase == "quantize":  # the first tensor is written, the rest are to come
    quantize.ShardedWriter.write = on_call(2, quantize.ShardedWriter.write)
else:  # the quality check, with the source model loaded
    verify._log_probs = on_call(1, verify._log_probs)
from mlxrun.cli import main
main(prog_name="mlxrun")
"""

_GRACE_S = 2.5  # exit within ~2 s of the signal (0.5 s grace plus cleanup), some slack for load


def _start(phase: str, src: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _DRIVER, phase, "convert", str(src), "-o", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _wait_for_burn(proc: subprocess.Popen) -> list[str]:
    lines = []
    deadline = time.time() + 180
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("BURNING"):
            return lines
    proc.kill()
    raise AssertionError("the conversion never reached the phase:\n" + "".join(lines))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("phase", ["quantize", "verify"])
def test_signal_stops_a_busy_phase_at_once(checkpoint_factory, tmp_path, phase, sig):
    src = checkpoint_factory("llama")
    out = tmp_path / "out"
    proc = _start(phase, src, out)
    before = _wait_for_burn(proc)
    if phase == "verify":
        assert any("Checking quality" in ln for ln in before), before
    partial = list(tmp_path.glob(".out.mlxrun-partial-*"))
    assert partial and any(partial[0].glob("*.safetensors")), "weights are being written"
    time.sleep(0.3)  # well inside the evaluation
    t0 = time.monotonic()
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"still running {_GRACE_S}s after {sig.name} during {phase}")
    elapsed = time.monotonic() - t0
    assert proc.returncode == 130, err
    errors = [ln for ln in err.splitlines() if ln.startswith("Error: ")]
    assert len(errors) == 1 and "interrupted" in errors[0] and "Traceback" not in err, err
    assert str(out) in errors[0]
    assert elapsed < _GRACE_S
    assert_nothing_left(out)


def test_library_callers_keep_their_process(checkpoint_factory, tmp_path):
    """Without exit_on_signal (a Python program calling convert_model) nothing exits the
    process: the interrupt unwinds as ConversionInterruptedError and cleans up."""
    src = checkpoint_factory("llama")
    out = tmp_path / "out"
    code = f"""
import os, signal, threading
from mlxrun.convert import quantize
from mlxrun.convert.api import convert_model
from mlxrun.errors import ConversionInterruptedError
real = quantize.ShardedWriter.write
def write(self, *a):
    os.kill(os.getpid(), signal.SIGTERM)
    return real(self, *a)
quantize.ShardedWriter.write = write
try:
    convert_model({str(src)!r}, {str(out)!r}, verify=False, quiet=True)
except ConversionInterruptedError as e:
    print("caught:", e.message)
print("still here")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env={**os.environ})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "caught: conversion interrupted" in proc.stdout and "still here" in proc.stdout
    assert_nothing_left(out)


def _stalling_hub(root: Path):
    """A local Hub whose weight downloads send their first KB and then stall, as on a slow
    line: the download phase lasts as long as the test wants."""
    from hubserver import HubServer

    class Stalled:
        def __init__(self, wfile):
            self.wfile = wfile

        def write(self, data: bytes) -> None:
            self.wfile.write(data[:1024])
            self.wfile.flush()
            time.sleep(60)

    class StallingHub(HubServer):
        def _handler_class(self):
            base = super()._handler_class()

            class Handler(base):
                def _resolve(self, owner, name, rev, file, body):
                    if body and file.endswith(".safetensors"):
                        self.wfile = Stalled(self.wfile)
                    super()._resolve(owner, name, rev, file, body)

            return Handler

    return StallingHub(root)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_a_download_at_once(tiny_llama, tmp_path, sig):
    (tmp_path / "repos" / "acme").mkdir(parents=True)
    (tmp_path / "repos" / "acme" / "tiny").symlink_to(tiny_llama)
    out = tmp_path / "out"
    with _stalling_hub(tmp_path / "repos") as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"),
               "HF_HUB_OFFLINE": "0"}  # fmt: skip
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlxrun.cli", "convert", "acme/tiny", "-o", str(out), "-q"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        deadline = time.time() + 120
        while not any(f.endswith(".safetensors") for f in hub.downloaded("acme/tiny")):
            assert time.time() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        time.sleep(0.3)
        t0 = time.monotonic()
        proc.send_signal(sig)
        try:
            _, err = proc.communicate(timeout=_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            pytest.fail(f"still running {_GRACE_S}s after {sig.name} during the download")
    assert time.monotonic() - t0 < _GRACE_S
    assert proc.returncode == 130, err
    assert "Error: conversion interrupted" in err and "Traceback" not in err, err
    assert_nothing_left(out)
