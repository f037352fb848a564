"""Untrusted model and cache files: chat templates that try to escape the sandbox, code shipped
with a checkpoint, configs with absurd sizes, safetensors headers that lie, and disk-cache files
that were tampered with."""

from __future__ import annotations

import json
import shutil
import stat
import struct
import tracemalloc
from pathlib import Path

import mlx.core as mx
import openai
import pytest

from mlxrun import hub, loader, safety
from mlxrun.cache import KVBlock
from mlxrun.errors import CorruptCheckpointError, InvalidRequestError
from mlxrun.tokenizer import load_tokenizer
from serverutil import MODEL_ID, make_app, serve_in_thread

ROOT = Path(__file__).resolve().parent.parent
# Jinja's classic sandbox escape: from a global (cycler) to the os module, then a shell command.
ESCAPE = (
    "{% for m in messages %}{{ m.content }}{% endfor %}"
    "{{ cycler.__init__.__globals__.os.popen('touch MARKER').read() }}"
)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _set_template(path: Path, template: str) -> None:
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = template
    config_path.write_text(json.dumps(config))


@pytest.fixture
def hostile_template(tiny_llama, tmp_path) -> tuple[Path, Path]:
    model = _copy(tiny_llama, tmp_path / "model")
    marker = tmp_path / "escaped"
    _set_template(model, ESCAPE.replace("MARKER", str(marker)))
    return model, marker


@pytest.mark.server
def test_a_sandbox_escape_is_reported_at_load_and_refused_per_request(hostile_template):
    model, marker = hostile_template
    tokenizer = load_tokenizer(model)
    problem = safety.check_chat_template(tokenizer)
    assert problem is not None and "unsafe" in problem
    assert str(model / "tokenizer_config.json") in problem and "\n" not in problem
    with pytest.raises(InvalidRequestError):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    with serve_in_thread(make_app(model)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(
                model=MODEL_ID, messages=[{"role": "user", "content": "hi"}], max_tokens=1
            )
        assert e.value.body["param"] == "messages"
    assert not marker.exists()  # the shell command never ran


@pytest.mark.model
def test_broken_and_fussy_templates(tiny_llama, tmp_path):
    assert safety.check_chat_template(load_tokenizer(tiny_llama)) is None
    broken = _copy(tiny_llama, tmp_path / "broken")
    (broken / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }")
    problem = safety.check_chat_template(load_tokenizer(broken))
    assert problem is not None and "broken" in problem
    assert str(broken / "chat_template.jinja") in problem
    # A template that refuses a system turn is the model's rule, not a broken file.
    fussy = _copy(tiny_llama, tmp_path / "fussy")
    _set_template(fussy, "{% for m in messages %}{% if m.role == 'system' %}"
                  "{{ raise_exception('no system role') }}{% endif %}{{ m.content }}{% endfor %}")  # fmt: skip
    assert safety.check_chat_template(load_tokenizer(fussy)) is None


@pytest.mark.model
def test_code_shipped_with_a_checkpoint_never_runs(tiny_llama, tmp_path):
    model = _copy(tiny_llama, tmp_path / "model")
    marker = tmp_path / "remote-code-ran"
    (model / "evil_tokenizer.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import PreTrainedTokenizerFast\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": [None, "evil_tokenizer.EvilTokenizer"]}
    config["tokenizer_class"] = "EvilTokenizer"
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(CorruptCheckpointError, match="custom code"):
        load_tokenizer(model)
    assert not marker.exists()
    # And nothing in mlxrun ever opts in.
    for folder in ("mlxrun", "server", "convert"):
        for source in (ROOT / folder).rglob("*.py"):
            text = source.read_text()
            assert "trust_remote_code=True" not in text.replace(" ", ""), source
            for line in text.splitlines():
                if "trust_remote_code" in line and "=" in line.split("trust_remote_code")[1][:2]:
                    assert "trust_remote_code=False" in line.replace(" ", ""), (source, line)


@pytest.mark.model
@pytest.mark.parametrize(
    "key, value",
    [("num_hidden_layers", 10**12), ("vocab_size", 2**40), ("hidden_size", -1),
     ("intermediate_size", 1.5e9), ("num_attention_heads", True)],
)  # fmt: skip
def test_absurd_config_sizes_are_refused_before_any_allocation(
    tiny_llama, tmp_path, monkeypatch, key, value
):
    model = _copy(tiny_llama, tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    config[key] = value
    (model / "config.json").write_text(json.dumps(config))

    def no_build(*args, **kwargs):
        raise AssertionError("the model was built from an absurd config")

    monkeypatch.setattr(loader.models, "build_model", no_build)
    monkeypatch.setattr(loader, "check_memory", no_build)
    with pytest.raises(safety.ImplausibleConfigError, match=key) as e:
        loader.load(model)
    assert isinstance(e.value, CorruptCheckpointError)  # the CLI and server map it already


@pytest.mark.model
def test_convert_refuses_an_absurd_config_before_planning(tiny_llama, tmp_path):
    from mlxrun.convert.api import convert_model

    model = _copy(tiny_llama, tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    config["num_hidden_layers"] = 10**12
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(safety.ImplausibleConfigError, match="num_hidden_layers"):
        convert_model(str(model), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.pure
def test_nested_text_config_is_checked_too():
    with pytest.raises(safety.ImplausibleConfigError, match="text_config.vocab_size"):
        safety.check_config({"model_type": "x", "text_config": {"vocab_size": 2**40}})
    safety.check_config({"num_hidden_layers": 126, "vocab_size": 262144, "hidden_size": 16384,
                         "num_local_experts": 0, "sliding_window": None})  # fmt: skip
    with pytest.raises(safety.ImplausibleConfigError, match="num_hidden_layers = 0"):
        safety.check_config({"num_hidden_layers": 0})


def _lying_shard(path: Path, header_len: int | None = None, header: dict | None = None) -> None:
    raw = json.dumps(header or {}).encode()
    path.write_bytes(struct.pack("<Q", header_len or len(raw)) + raw + b"\0" * 64)


@pytest.mark.pure
def test_a_huge_safetensors_header_length_is_refused_without_reading(tmp_path):
    shard = tmp_path / "model.safetensors"
    _lying_shard(shard, header_len=2**60)
    tracemalloc.start()
    try:
        with pytest.raises(CorruptCheckpointError, match="bad safetensors header"):
            hub.safetensors_header(shard)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # nothing the size of the claimed header was allocated


@pytest.mark.model
@pytest.mark.parametrize("kind", ["huge_header", "lying_offsets"])
def test_a_model_with_a_lying_shard_never_reaches_mlx(tiny_llama, tmp_path, monkeypatch, kind):
    model = _copy(tiny_llama, tmp_path / "model")
    shard = sorted(model.glob("*.safetensors"))[-1]
    if kind == "huge_header":
        _lying_shard(shard, header_len=2**60)
    else:  # a tensor of 10^9 floats in a file of a few bytes
        fake = {"w": {"dtype": "F32", "shape": [10**9], "data_offsets": [0, 4 * 10**9]}}
        _lying_shard(shard, header=fake)
    loaded: list[str] = []
    monkeypatch.setattr(loader.mx, "load", lambda *a, **k: loaded.append(a[0]) or {})
    with pytest.raises(CorruptCheckpointError):
        loader.load(model)
    assert loaded == []


# ---------------------------------------------------------------- disk cache


def _block(length: int) -> KVBlock:
    k = mx.arange(length * 8, dtype=mx.float32).reshape(1, 2, length, 4)
    return KVBlock([(k, -k), (k + 1, -k - 1)])


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# The disk tier's own file checks (private modes, torn, foreign, reshaped and corrupted files
# removed and never loaded) are in tests/test_disk_tier.py.
