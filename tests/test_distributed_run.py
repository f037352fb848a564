"""Two ranks for real: MLX's `mlx.launch -n 2 --backend ring` on 127.0.0.1 (CPU backend).

Marked slow: each run starts two Python processes that import MLX and load the model.
The reference is the same `generate` command in one process.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlxrun import launch
from mlxrun.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.model]

PROMPT = "def add(a, b):"
RUN_TIMEOUT_S = 240


def free_port_pair() -> int:
    """A port p with p and p+1 free (the ring backend listens on one per rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as s2:
                s2.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair")


def gen_args(model: Path, *extra: str) -> list[str]:
    return ["generate", str(model), "-p", PROMPT, "--temperature", "0", "--max-tokens", "24",
            *extra]  # fmt: skip


def one_process(model: Path) -> str:
    res = CliRunner().invoke(main, gen_args(model))
    assert res.exit_code == 0, res.output
    assert res.stdout.strip()
    return res.stdout


def run(argv: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=env)


def mlx_launch(*args: str) -> list[str]:
    port = free_port_pair()
    return [*launch.launcher_argv(), "-n", "2", "--backend", "ring", "--starting-port", str(port),
            "--", sys.executable, "-m", "mlxrun", *args]  # fmt: skip


def test_generate_tensor_parallel_matches_one_process(tiny_llama):
    want = one_process(tiny_llama)
    done = run(mlx_launch(*gen_args(tiny_llama)))
    assert done.returncode == 0, done.stderr
    assert done.stdout == want  # only rank 0 writes, and writes exactly one process's text
    assert "distributed: 2 ranks, tensor parallel (ring)" in done.stderr
    assert done.stderr.count("| generation: 24 tokens") == 1  # the stats line once, from rank 0


def test_generate_through_mlxrun_launch_matches_one_process(checkpoint_factory):
    model = checkpoint_factory("qwen2", num_layers=3)
    want = one_process(model)
    port = free_port_pair()
    argv = [sys.executable, "-m", "mlxrun", "launch", "--hosts", "127.0.0.1", "-n", "2",
            "--starting-port", str(port), *gen_args(model)]  # fmt: skip
    done = run(argv)
    assert done.returncode == 0, done.stderr
    printed, text = done.stdout.split("\n", 1)
    assert "mlx.launch" in printed or "_distributed_utils.launch" in printed
    assert text == want
    assert "matches on every host" in done.stderr
    assert "distributed: 2 ranks, tensor parallel (ring)" in done.stderr


def test_unsupported_architecture_fails_on_every_rank(checkpoint_factory):
    model = checkpoint_factory("mixtral")
    port = free_port_pair()
    argv = [sys.executable, "-m", "mlxrun", "launch", "--hosts", "127.0.0.1", "-n", "2",
            "--starting-port", str(port), *gen_args(model)]  # fmt: skip
    done = run(argv)
    assert done.returncode != 0  # mlx.launch itself says 0; mlxrun launch reads its rank log
    assert "architecture 'mixtral' cannot run across machines" in done.stderr
    assert "distributed run failed: rank" in done.stderr
