"""Shared pytest fixtures: hermetic environment and cached tiny checkpoints.

Every test carries exactly one tier marker (pure, model, server; see tests/tiers.py): collection
stops if one has none or two, and a pure test fails if it builds a model or a server.

Every test runs offline (HF_HUB_OFFLINE=1, no telemetry) with MLXRUN_HOME pointing at a fresh
temporary directory, so nothing reads or writes ~/.mlxrun or reaches the network.

Checkpoints come from `tests/fixtures` (importable as `fixtures`, see below):

    def test_something(checkpoint_factory):
        path = checkpoint_factory("qwen2", num_shards=3, dtype="bfloat16")

    def test_other(tiny_llama):          # llama, bpe tokenizer, 2 shards, float32
        ...

A checkpoint is built once per distinct set of arguments per session and shared by every test
that asks for it. Treat the returned directory as read-only: copy it first
(`shutil.copytree(path, tmp_path / "m")`) if a test needs to change, delete or add files.
A session-end check fails loudly if a shared checkpoint was modified.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

# huggingface_hub reads these once at import time, so they are set before anything imports it;
# the autouse fixture below sets them again for code that reads the environment per call.
HERMETIC_ENV = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
os.environ.update(HERMETIC_ENV)

# Make `import fixtures` work under any pytest import mode (importlib mode adds nothing).
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fixtures import build_checkpoint  # noqa: E402

# tiers: the tier check and the pure guard. pytester: tests/test_tiers.py runs small sessions.
pytest_plugins = ["tiers", "pytester"]

_BUILD_PARAMS = inspect.signature(build_checkpoint).parameters


@pytest.fixture(autouse=True)
def _hermetic_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory):
    for name, value in HERMETIC_ENV.items():
        monkeypatch.setenv(name, value)
    # Its own directory (not inside tmp_path) so tests that inspect tmp_path see only their files.
    monkeypatch.setenv("MLXRUN_HOME", str(tmp_path_factory.mktemp("mlxrun_home")))


def _snapshot(path: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(path.rglob("*"))
    }


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`(arch="llama", tokenizer="bpe", num_shards=2, dtype="float32", **kw) -> Path`.

    Extra keywords are those of `fixtures.build_checkpoint` (seed, num_layers, hidden_size,
    intermediate_size). The returned directory is shared: do not modify it.
    """
    root = tmp_path_factory.mktemp("checkpoints")
    built: dict[tuple, Path] = {}
    snapshots: dict[Path, dict[str, tuple[int, int]]] = {}

    def factory(
        arch: str = "llama",
        tokenizer: str = "bpe",
        num_shards: int = 2,
        dtype: str = "float32",
        **kw,
    ) -> Path:
        unknown = set(kw) - set(_BUILD_PARAMS)
        if unknown:
            raise TypeError(f"unknown build_checkpoint arguments: {sorted(unknown)}")
        args = {name: p.default for name, p in _BUILD_PARAMS.items() if name != "out_dir"}
        args.update(kw, arch=arch, tokenizer=tokenizer, num_shards=num_shards, dtype=dtype)
        key = tuple(sorted(args.items()))
        if key not in built:
            slug = "-".join(str(args[k]) for k in ("arch", "tokenizer", "num_shards", "dtype"))
            path = build_checkpoint(root / f"{slug}-{len(built)}", **args)
            built[key] = path
            snapshots[path] = _snapshot(path)
        return built[key]

    yield factory

    changed = [str(p) for p, snap in snapshots.items() if _snapshot(p) != snap]
    if changed:
        raise AssertionError(
            f"shared checkpoints were modified by a test (copy them first): {changed}"
        )


@pytest.fixture(scope="session")
def tiny_llama(checkpoint_factory: Callable[..., Path]) -> Path:
    """The default checkpoint: llama, byte-level BPE tokenizer, 2 shards, float32. Read-only."""
    return checkpoint_factory("llama")


# A Qwen3/DeepSeek-R1 style template: the generation prompt opens a <think> block, and replies in
# the history lose theirs.
THINKING_TEMPLATE = """\
{%- for message in messages %}
{%- set content = message.content %}
{%- if message.role == 'assistant' and '</think>' in content %}
{%- set content = content.split('</think>')[-1].lstrip('\\n') %}
{%- endif %}
{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}
"""


@pytest.fixture(scope="session")
def thinking_model(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with THINKING_TEMPLATE: a model that thinks. Read-only."""
    path = tmp_path_factory.mktemp("thinking") / "model"
    shutil.copytree(tiny_llama, path)
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = THINKING_TEMPLATE
    config_path.write_text(json.dumps(config))
    return path
