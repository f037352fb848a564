"""The local model store, and `mlxrun list / show / rm / pull` through the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hubserver import HubServer, hub_env, run_cli, write_mlx_model
from mlxrun import store
from mlxrun.errors import InvalidRequestError, ModelNotFoundError, OutputExistsError

MIXED = {"model.layers.0.mlp.down_proj": 6, "model.layers.1.self_attn.v_proj": 6, "lm_head": 6}


@pytest.fixture
def home(tmp_path: Path, monkeypatch) -> Path:
    home = tmp_path / "mlxrun-home"
    monkeypatch.setenv("MLXRUN_HOME", str(home))
    return home


@pytest.fixture
def two_models(home: Path) -> Path:
    models = home / "models"
    write_mlx_model(models / "tiny-4bit", metadata={"source": "acme/tiny", "recipe": "4-bit g64"})
    write_mlx_model(models / "tiny-mixed", overrides=MIXED)
    (models / ".tiny-4bit.mlxrun-partial-123").mkdir()  # a conversion in progress
    (models / "notes").mkdir()  # not a model: no config.json
    return models


@pytest.mark.pure
def test_home_and_models_dir(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("MLXRUN_HOME", str(tmp_path / "h"))
    assert store.mlxrun_home() == tmp_path / "h"
    assert store.models_dir() == tmp_path / "h" / "models"
    monkeypatch.delenv("MLXRUN_HOME")
    assert store.mlxrun_home() == Path.home() / ".mlxrun"


@pytest.mark.pure
def test_default_name(tmp_path: Path):
    assert store.default_name("Qwen/Qwen2.5-0.5B") == "Qwen2.5-0.5B"
    assert store.default_name(str(tmp_path / "my-model") + "/") == "my-model"
    snap = tmp_path / "hub" / "models--acme--tiny-llm" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    assert store.default_name(str(snap)) == "tiny-llm"


@pytest.mark.pure
@pytest.mark.parametrize("bad", ["", "  ", "a/b", "..", ".hidden", "a\\b", "x\ny", "c:d"])
def test_validate_name_rejects(bad: str):
    with pytest.raises(InvalidRequestError) as exc:
        store.validate_name(bad)
    assert exc.value.param == "name"


@pytest.mark.pure
def test_validate_name_accepts():
    assert store.validate_name("Qwen2.5-0.5B-4bit_v2") == "Qwen2.5-0.5B-4bit_v2"


@pytest.mark.pure
def test_list_models(two_models: Path):
    models = store.list_models()
    assert [m.name for m in models] == ["tiny-4bit", "tiny-mixed"]
    q4, mixed = models
    assert q4.architecture == "llama"
    assert q4.quantization == "4-bit g64"
    assert q4.source == "acme/tiny"
    assert q4.context_length == 512
    assert q4.size_bytes == (two_models / "tiny-4bit" / "model.safetensors").stat().st_size
    assert q4.path == two_models / "tiny-4bit"
    assert mixed.quantization == "mixed_4_6 g64"
    assert mixed.source is None
    assert mixed.bits_per_weight > q4.bits_per_weight


@pytest.mark.pure
def test_list_models_empty(home: Path):
    assert store.list_models() == []


@pytest.mark.model
@pytest.mark.parametrize(
    "kwargs",
    [
        {"bits": 4},
        {"bits": 3, "group_size": 32},
        {"bits": 8, "group_size": 64},
        {"bits": 6, "group_size": 64, "overrides": {"model.layers.1.mlp.down_proj": 5}},
        {"bits": 4, "overrides": MIXED},
        {"bits": 2, "overrides": {"lm_head": 8, "model.embed_tokens": 6}},
        {"bits": None},
        {"bits": 4, "config": {"tie_word_embeddings": True}},
    ],
)
def test_bits_per_weight_matches_mlx_lm(tmp_path: Path, kwargs: dict):
    from mlx_lm.utils import compute_bits_per_weight, load_model

    path = write_mlx_model(tmp_path / "m", **kwargs)
    model, _ = load_model(path)
    expected = compute_bits_per_weight(model)
    assert store.model_info(path).bits_per_weight == pytest.approx(expected, rel=1e-3)


@pytest.mark.pure
def test_bits_per_weight_without_bits_in_config(tmp_path: Path):
    """Shapes alone give the bits when the config section lacks them."""
    path = write_mlx_model(tmp_path / "m", bits=3, group_size=32)
    expected = store.model_info(path).bits_per_weight
    config = json.loads((path / "config.json").read_text())
    config["quantization"] = {"group_size": 32}
    (path / "config.json").write_text(json.dumps(config))
    assert store.model_info(path).bits_per_weight == pytest.approx(expected)


@pytest.mark.pure
def test_quantization_labels(tmp_path: Path):
    f16 = write_mlx_model(tmp_path / "f16", bits=None)
    assert store.model_info(f16).quantization == "f16"
    recipe = write_mlx_model(tmp_path / "r", overrides=MIXED, metadata={"recipe": "mixed_4_6 g64"})
    assert store.model_info(recipe).quantization == "mixed_4_6 g64"
    q8 = write_mlx_model(tmp_path / "q8", bits=8, group_size=32)
    assert store.model_info(q8).quantization == "8-bit g32"


@pytest.mark.pure
def test_context_length_from_text_config(tmp_path: Path):
    path = write_mlx_model(tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    del config["max_position_embeddings"]
    config["text_config"] = {"max_position_embeddings": 32768}
    (path / "config.json").write_text(json.dumps(config))
    assert store.model_info(path).context_length == 32768


@pytest.mark.pure
def test_get_model_suggests_a_close_name(two_models: Path):
    assert store.get_model("tiny-4bit").name == "tiny-4bit"
    with pytest.raises(ModelNotFoundError) as exc:
        store.get_model("tiny-4bt")
    assert "tiny-4bt" in exc.value.message
    assert "Did you mean 'tiny-4bit'?" in exc.value.hint
    with pytest.raises(ModelNotFoundError) as exc:
        store.get_model("completely-different")
    assert "Did you mean" not in exc.value.hint


@pytest.mark.pure
def test_get_model_validates_the_name(two_models: Path):
    with pytest.raises(InvalidRequestError):
        store.get_model("../models/tiny-4bit")


@pytest.mark.pure
def test_remove_model(two_models: Path):
    store.remove_model("tiny-mixed")
    assert not (two_models / "tiny-mixed").exists()
    assert [m.name for m in store.list_models()] == ["tiny-4bit"]
    assert not [p for p in two_models.iterdir() if ".trash-" in p.name]
    with pytest.raises(ModelNotFoundError):
        store.remove_model("tiny-mixed")


@pytest.mark.pure
def test_resolve_model_order(two_models: Path, tmp_path: Path, monkeypatch):
    assert store.resolve_model("tiny-4bit") == two_models / "tiny-4bit"
    local = write_mlx_model(tmp_path / "elsewhere" / "local-model")
    assert store.resolve_model(str(local)) == local
    # A directory named like a store entry, relative to the cwd, loses to the store entry.
    monkeypatch.chdir(tmp_path)
    write_mlx_model(tmp_path / "tiny-4bit")
    assert store.resolve_model("tiny-4bit") == two_models / "tiny-4bit"
    with pytest.raises(ModelNotFoundError) as exc:
        store.resolve_model("tiny-4bti")
    assert "Did you mean 'tiny-4bit'?" in exc.value.hint


@pytest.mark.pure
def test_resolve_model_from_the_hub(home: Path, tmp_path: Path):
    write_mlx_model(tmp_path / "repos" / "acme" / "tiny")
    with HubServer(tmp_path / "repos") as server, hub_env(server.url, tmp_path / "hf"):
        path = store.resolve_model("acme/tiny", progress=False)
    assert path.parent.name == "snapshots" and path.parent.parent.name == "models--acme--tiny"
    assert path.is_relative_to(tmp_path / "hf")
    assert (path / "config.json").is_file()


@pytest.mark.pure
def test_add_from_dir_is_atomic_and_refuses_to_overwrite(home: Path, tmp_path: Path):
    src = write_mlx_model(tmp_path / "src")
    dest = store.add_from_dir(src, "copy", {"source": "acme/src"})
    assert dest == store.models_dir() / "copy"
    assert store.get_model("copy").source == "acme/src"
    with pytest.raises(OutputExistsError):
        store.add_from_dir(src, "copy", {})
    store.add_from_dir(src, "copy", {"source": "again"}, force=True)
    assert store.get_model("copy").source == "again"
    assert sorted(p.name for p in store.models_dir().iterdir()) == ["copy"]


# --- the real CLI in a subprocess ----------------------------------------------------------------


def _env(home: Path, **extra: str) -> dict[str, str]:
    return {"MLXRUN_HOME": str(home), "HF_HUB_OFFLINE": "1", **extra}


@pytest.mark.pure
def test_cli_list_empty(home: Path):
    r = run_cli("list", env=_env(home))
    assert r.returncode == 0, r.stderr
    assert "no models yet" in r.stdout and "mlxrun pull" in r.stdout


@pytest.mark.pure
def test_cli_list_show_rm(two_models: Path, home: Path):
    env = _env(home)
    r = run_cli("list", env=env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["NAME", "ARCH", "SIZE", "BITS/W", "CONTEXT", "QUANT"]
    assert [ln.split()[0] for ln in lines[1:]] == ["tiny-4bit", "tiny-mixed"]
    info = store.get_model("tiny-4bit")
    assert f"{info.bits_per_weight:.2f}" in lines[1] and "4-bit g64" in lines[1]

    listed = json.loads(run_cli("list", "--json", env=env).stdout)
    assert [m["name"] for m in listed] == ["tiny-4bit", "tiny-mixed"]
    assert listed[0]["size_bytes"] == info.size_bytes
    assert listed[0]["context_length"] == 512

    shown = run_cli("show", "tiny-4bit", env=env)
    assert shown.returncode == 0, shown.stderr
    assert str(two_models / "tiny-4bit") in shown.stdout and "acme/tiny" in shown.stdout
    as_json = json.loads(run_cli("show", "tiny-4bit", "--json", env=env).stdout)
    assert as_json["path"] == str(two_models / "tiny-4bit")
    assert as_json["quantization"] == "4-bit g64"

    kept = run_cli("rm", "tiny-mixed", env=env, stdin="n\n")
    assert kept.returncode != 0
    assert (two_models / "tiny-mixed").is_dir()
    gone = run_cli("rm", "tiny-mixed", env=env, stdin="y\n")
    assert gone.returncode == 0, gone.stderr
    assert not (two_models / "tiny-mixed").exists()
    assert run_cli("rm", "-y", "tiny-4bit", env=env).returncode == 0
    assert "no models yet" in run_cli("list", env=env).stdout


@pytest.mark.pure
def test_cli_unknown_model_is_one_line_with_suggestion(two_models: Path, home: Path):
    r = run_cli("show", "tiny-4bt", env=_env(home))
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1, r.stderr
    assert "no model named 'tiny-4bt'" in r.stderr
    assert "Did you mean 'tiny-4bit'?" in r.stderr
    assert "Traceback" not in r.stderr
    debug = run_cli("rm", "-y", "tiny-4bt", env=_env(home, MLXRUN_DEBUG="1"))
    assert debug.returncode == 1 and "Traceback" in debug.stderr


@pytest.mark.pure
def test_cli_rejects_bad_names(home: Path):
    r = run_cli("pull", "acme/tiny", "--name", "../evil", env=_env(home))
    assert r.returncode == 1 and "invalid model name" in r.stderr
    assert not (home.parent / "evil").exists()


@pytest.fixture
def hub_repos(tmp_path: Path) -> Path:
    root = tmp_path / "repos"
    write_mlx_model(root / "mlx-community" / "tiny-4bit")
    (root / "mlx-community" / "tiny-4bit" / "pytorch_model.bin").write_bytes(b"\0" * 64)
    return root


@pytest.mark.pure
def test_cli_pull_mlx_repo(hub_repos: Path, home: Path, tmp_path: Path):
    with HubServer(hub_repos) as server:
        env = _env(home, HF_ENDPOINT=server.url, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="0")
        r = run_cli("pull", "mlx-community/tiny-4bit", "-q", env=env)
        assert r.returncode == 0, r.stderr
        assert "pytorch_model.bin" not in server.downloaded("mlx-community/tiny-4bit")
        again = run_cli("pull", "mlx-community/tiny-4bit", "-q", env=env)
        assert again.returncode == 1 and "already exists" in again.stderr
        renamed = run_cli("pull", "mlx-community/tiny-4bit", "--name", "t2", "-q", env=env)
        assert renamed.returncode == 0, renamed.stderr
        requantize = run_cli("pull", "mlx-community/tiny-4bit", "--bits", "3", env=env)
        assert requantize.returncode == 1 and "already holds MLX weights" in requantize.stderr
    info = store.get_model("tiny-4bit")
    assert info.source == "mlx-community/tiny-4bit"
    assert info.quantization == "4-bit g64"
    assert not (info.path / "pytorch_model.bin").exists()
    # Files are links to the HF cache blobs (or copies), never symlinks into it.
    assert not (info.path / "model.safetensors").is_symlink()
    listed = run_cli("list", env=_env(home)).stdout
    assert "tiny-4bit" in listed and "t2" in listed
    assert sorted(p.name for p in store.models_dir().iterdir()) == ["t2", "tiny-4bit"]


@pytest.mark.pure
def test_cli_pull_unknown_repo(hub_repos: Path, home: Path, tmp_path: Path):
    with HubServer(hub_repos) as server:
        env = _env(home, HF_ENDPOINT=server.url, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="0")
        r = run_cli("pull", "mlx-community/nope", env=env)
    assert r.returncode == 1
    assert r.stderr.startswith("Error: repo mlx-community/nope not found on the Hub")
    assert "Traceback" not in r.stderr
    assert not store.models_dir().exists() or not list(store.models_dir().iterdir())


@pytest.mark.model
@pytest.mark.slow
def test_cli_pull_converts_a_plain_checkpoint(home: Path, tmp_path: Path, tiny_llama: Path):
    (tmp_path / "repos" / "acme").mkdir(parents=True)
    (tmp_path / "repos" / "acme" / "plain").symlink_to(tiny_llama)  # served read-only
    with HubServer(tmp_path / "repos") as server:
        env = _env(home, HF_ENDPOINT=server.url, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="0")
        r = run_cli("pull", "acme/plain", "--no-verify", "-q", env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    [info] = store.list_models()
    assert info.name.startswith("plain")
    assert info.quantization == "4-bit g64"
    assert info.source == "acme/plain"
    from mlx_lm.utils import compute_bits_per_weight, load_model

    model, _ = load_model(info.path)
    assert info.bits_per_weight == pytest.approx(compute_bits_per_weight(model), rel=1e-3)
