"""mlxrun.hub against the real huggingface_hub, talking to a local Hub-compatible server."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from hubserver import HubServer, hub_env, run_cli, write_mlx_model
from mlxrun import hub
from mlxrun.errors import (
    InvalidRequestError,
    ModelNotFoundError,
    NotAModelError,
    OfflineError,
    RepoNotFoundError,
)

pytestmark = pytest.mark.pure

# What the local "Hub" holds besides the files mlxrun needs: none of these may be fetched.
UNWANTED = ("pytorch_model.bin", "model.gguf", "modeling_custom.py", "onnx/model.onnx")
WANTED = {"config.json", "model.safetensors", "tokenizer_config.json", "tokenizer.json",
          "merges.txt", "chat_template.jinja", "tokenizer.model"}  # fmt: skip


@pytest.fixture
def repos(tmp_path: Path) -> Path:
    root = tmp_path / "repos"
    tiny = write_mlx_model(root / "acme" / "tiny")
    for name in ("tokenizer.json", "merges.txt", "chat_template.jinja", "tokenizer.model"):
        (tiny / name).write_text(f"{name} contents\n")
    for name in UNWANTED:
        (tiny / name).parent.mkdir(parents=True, exist_ok=True)
        (tiny / name).write_bytes(b"\0" * 1000)
    # Mistral-style duplicate weights and Llama-style original/ copies are skipped too.
    (tiny / "consolidated.safetensors").write_bytes((tiny / "model.safetensors").read_bytes())
    (tiny / "original").mkdir()
    (tiny / "original" / "params.json").write_text("{}")
    binonly = root / "acme" / "bin-only"
    binonly.mkdir(parents=True)
    (binonly / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (binonly / "pytorch_model.bin").write_bytes(b"\0" * 100)
    write_mlx_model(root / "acme" / "gated")
    return root


@pytest.fixture
def server(repos: Path):
    with HubServer(repos, gated=("acme/gated",)) as srv:
        yield srv


@pytest.fixture
def online(server: HubServer, tmp_path: Path):
    with hub_env(server.url, tmp_path / "hf"):
        yield server


def _free_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # closed again: nothing listens there


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Qwen/Qwen2.5-0.5B", True),
        ("mlx-community/Llama-3.2-1B-Instruct-4bit", True),
        ("a/b", True),
        ("Qwen2.5-0.5B", False),
        ("/abs/path", False),
        ("./rel/path", False),
        ("a/b/c", False),
        ("a--b/c", False),
        ("a/../b", False),
        ("-a/b", False),
        ("a/b-", False),
        ("_org/model_", True),
        ("a/" + "b" * 96, True),
        ("a/" + "b" * 97, False),
        ("ü/b", False),
        ("", False),
    ],
)
def test_is_repo_id(text: str, expected: bool):
    assert hub.is_repo_id(text) is expected


def test_is_repo_id_false_for_existing_local_path(tmp_path: Path, monkeypatch):
    (tmp_path / "owner" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert hub.is_repo_id("owner/name") is False
    assert hub.is_repo_id("owner/other") is True


def test_resolve_local_directory(tmp_path: Path):
    model = write_mlx_model(tmp_path / "m")
    assert hub.resolve_source(str(model)) == model


def test_resolve_missing_local_directory(tmp_path: Path):
    with pytest.raises(ModelNotFoundError) as exc:
        hub.resolve_source(str(tmp_path / "nope"))
    assert "nope" in exc.value.message


def test_resolve_local_directory_without_config(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotAModelError):
        hub.resolve_source(str(tmp_path / "empty"))


def test_download_fetches_only_needed_files(online: HubServer):
    path = hub.resolve_source("acme/tiny", progress=False)
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert online.downloaded("acme/tiny") == WANTED
    touched = {p for _, p in online.requests}
    for name in (*UNWANTED, "consolidated.safetensors", "original/params.json"):
        assert not any(p.endswith("/" + name) for p in touched), name
        assert not (path / name).exists()
    assert hub.is_mlx_model(path)


def test_second_run_offline_uses_cache(server: HubServer, tmp_path: Path):
    with hub_env(server.url, tmp_path / "hf"):
        first = hub.resolve_source("acme/tiny", progress=False)
    seen = len(server.requests)
    with hub_env(server.url, tmp_path / "hf", offline=True):
        second = hub.resolve_source("acme/tiny", progress=False)
    assert second == first
    assert len(server.requests) == seen  # not a single request went out


def test_cached_model_is_used_when_the_hub_is_unreachable(server: HubServer, tmp_path: Path):
    with hub_env(server.url, tmp_path / "hf"):
        first = hub.resolve_source("acme/tiny", progress=False)
    with hub_env(_free_port_url(), tmp_path / "hf"):
        assert hub.resolve_source("acme/tiny", progress=False) == first


def test_offline_without_cache_is_offline_error(server: HubServer, tmp_path: Path):
    with hub_env(server.url, tmp_path / "hf", offline=True):
        with pytest.raises(OfflineError) as exc:
            hub.resolve_source("acme/tiny", progress=False)
    assert "acme/tiny" in exc.value.message
    assert "HF_HUB_OFFLINE" in exc.value.hint
    assert server.requests == []


def test_unreachable_hub_without_cache_is_offline_error(tmp_path: Path):
    url = _free_port_url()
    with hub_env(url, tmp_path / "hf"):
        with pytest.raises(OfflineError) as exc:
            hub.resolve_source("acme/tiny", progress=False)
    assert url in exc.value.message


def test_unknown_repo(online: HubServer):
    with pytest.raises(RepoNotFoundError) as exc:
        hub.resolve_source("acme/missing", progress=False)
    assert "acme/missing" in exc.value.message


def test_gated_repo_names_login(online: HubServer):
    with pytest.raises(RepoNotFoundError) as exc:
        hub.resolve_source("acme/gated", progress=False)
    assert "gated" in exc.value.message
    assert "login" in exc.value.hint


def test_unknown_revision(online: HubServer):
    with pytest.raises(InvalidRequestError) as exc:
        hub.resolve_source("acme/tiny", revision="v9", progress=False)
    assert exc.value.param == "revision"
    assert "v9" in exc.value.message


def test_revision_by_commit_hash(online: HubServer):
    main = hub.resolve_source("acme/tiny", progress=False)
    assert hub.resolve_source("acme/tiny", revision=main.name, progress=False) == main


def test_repo_without_safetensors(online: HubServer):
    with pytest.raises(NotAModelError) as exc:
        hub.resolve_source("acme/bin-only", progress=False)
    assert "safetensors" in exc.value.message
    assert online.downloaded("acme/bin-only") == {"config.json"}


def test_allow_patterns_narrow_the_download(online: HubServer):
    path = hub.resolve_source("acme/tiny", allow_patterns=["config.json"], progress=False)
    assert sorted(p.name for p in path.iterdir()) == ["config.json"]
    assert online.downloaded("acme/tiny") == {"config.json"}
    # The full download later reuses the cached config and fetches the rest.
    full = hub.resolve_source("acme/tiny", progress=False)
    assert full == path and (full / "model.safetensors").is_file()
    config_gets = [p for m, p in online.requests if m == "GET" and p.endswith("/config.json")]
    assert len(config_gets) == 1


def test_progress_bars_follow_the_flag(online: HubServer, capfd):
    hub.resolve_source("acme/tiny", progress=False)
    assert capfd.readouterr().err == ""


def test_is_mlx_model(tmp_path: Path):
    assert hub.is_mlx_model(write_mlx_model(tmp_path / "q4"))
    assert hub.is_mlx_model(write_mlx_model(tmp_path / "f16", bits=None))  # via "format": "mlx"
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"model_type": "llama"}))
    import mlx.core as mx

    mx.save_safetensors(str(plain / "model.safetensors"), {"w": mx.zeros((2, 2))})
    assert not hub.is_mlx_model(plain)
    assert not hub.is_mlx_model(tmp_path / "missing")


def test_safetensors_header_is_read_without_the_data(tmp_path: Path):
    model = write_mlx_model(tmp_path / "m")
    header = hub.safetensors_header(model / "model.safetensors")
    assert header["__metadata__"] == {"format": "mlx"}
    assert header["lm_head.weight"]["dtype"] == "U32"
    truncated = tmp_path / "bad.safetensors"
    truncated.write_bytes((model / "model.safetensors").read_bytes()[:20])
    from mlxrun.errors import CorruptCheckpointError

    with pytest.raises(CorruptCheckpointError):
        hub.safetensors_header(truncated)


# --- through the CLI, in a subprocess: env vars are read at import, as in real use ---------------


def test_cli_offline_without_cache_is_one_line(server: HubServer, tmp_path: Path):
    env = {
        "HF_ENDPOINT": server.url,
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "1",
        "MLXRUN_HOME": str(tmp_path / "home"),
    }
    r = run_cli("pull", "acme/tiny", env=env)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("Error: acme/tiny is not in the local Hugging Face cache")
    assert "Traceback" not in r.stderr
    debug = run_cli("pull", "acme/tiny", env={**env, "MLXRUN_DEBUG": "1"})
    assert debug.returncode == 1
    assert "Traceback" in debug.stderr and "OfflineError" in debug.stderr


def test_incomplete_cached_snapshot_offline(server: HubServer, tmp_path: Path):
    """An interrupted download followed by offline use: say the cached copy is incomplete."""
    with hub_env(server.url, tmp_path / "hf"):
        path = hub.resolve_source("acme/tiny", progress=False)
    (path / "model.safetensors").unlink()
    with hub_env(server.url, tmp_path / "hf", offline=True):
        with pytest.raises(OfflineError) as exc:
            hub.resolve_source("acme/tiny", progress=False)
    assert "incomplete" in exc.value.message
    with hub_env(server.url, tmp_path / "hf"):  # back online, the download completes
        assert (hub.resolve_source("acme/tiny", progress=False) / "model.safetensors").is_file()


def test_server_error_without_cache_is_offline_error(tmp_path: Path):
    """A Hub that answers 5xx, with nothing cached, is a typed error, not a crash."""
    import http.server
    import threading

    class Failing(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Failing)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        with hub_env(f"http://127.0.0.1:{httpd.server_address[1]}", tmp_path / "hf"):
            with pytest.raises(OfflineError) as exc:
                hub.resolve_source("acme/tiny", progress=False)
        assert "cannot be reached" in exc.value.message
    finally:
        httpd.shutdown()
        httpd.server_close()
