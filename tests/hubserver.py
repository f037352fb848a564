"""A tiny Hub-compatible HTTP server on 127.0.0.1, for download tests with the real huggingface_hub.

It serves `root/<owner>/<name>/...` as model repos with one revision ("main", or its commit sha)
and implements what `snapshot_download` calls:

- GET  /api/models/{repo}[/revision/{rev}]  -> {"id", "sha", "siblings": [...]}
- GET  /api/models/{repo}/tree/{rev}[/{path}]  -> [{"type", "path", "oid", "size", "lfs"?}, ...]
- HEAD/GET /{repo}/resolve/{rev}/{file}  -> bytes with ETag, X-Repo-Commit, Content-Length and,
  for LFS-style files (*.safetensors, *.bin, *.gguf), X-Linked-Etag / X-Linked-Size.

Errors carry the `X-Error-Code` header huggingface_hub dispatches on (RepoNotFound,
RevisionNotFound, EntryNotFound, GatedRepo). Every request is recorded in `requests`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pth", ".onnx")


def _git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Repo:
    def __init__(self, repo_id: str, path: Path):
        self.id = repo_id
        self.path = path
        self.files = sorted(
            str(p.relative_to(path)).replace("\\", "/") for p in path.rglob("*") if p.is_file()
        )
        digest = hashlib.sha1()
        for name in self.files:
            digest.update(name.encode() + b"\0" + _git_blob_sha(self.read(name)).encode())
        self.sha = digest.hexdigest()

    def read(self, name: str) -> bytes:
        return (self.path / name).read_bytes()

    def entry(self, name: str) -> dict:
        data = self.read(name)
        item = {"type": "file", "path": name, "oid": _git_blob_sha(data), "size": len(data)}
        if name.endswith(LFS_SUFFIXES):
            item["lfs"] = {
                "oid": hashlib.sha256(data).hexdigest(),
                "size": len(data),
                "pointerSize": 134,
            }
        return item


class HubServer:
    """Start with `with HubServer(root) as hub:`; `hub.url` is the HF_ENDPOINT to use."""

    def __init__(self, root: Path, gated: tuple[str, ...] = ()):
        self.root = Path(root)
        self.gated = set(gated)
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def downloaded(self, repo_id: str) -> set[str]:
        """Files of `repo_id` fetched with GET /resolve/ so far."""
        prefix = f"/{repo_id}/resolve/"
        with self._lock:
            paths = [p for m, p in self.requests if m == "GET" and p.startswith(prefix)]
        return {p[len(prefix) :].split("/", 1)[1] for p in paths}

    def start(self) -> HubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _repo(self, owner: str, name: str) -> _Repo | None:
        path = self.root / owner / name
        return _Repo(f"{owner}/{name}", path) if path.is_dir() else None

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(_Handler):
            hub = server

        return Handler


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        self._dispatch(body=True)

    def do_HEAD(self) -> None:
        self._dispatch(body=False)

    def _dispatch(self, body: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        with self.hub._lock:
            self.hub.requests.append((self.command, path))
        parts = [p for p in path.split("/") if p]
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            self._api(parts[2], parts[3], parts[4:], body)
        elif len(parts) >= 5 and parts[2] == "resolve":
            self._resolve(parts[0], parts[1], parts[3], "/".join(parts[4:]), body)
        else:
            self._error(404, "NotFound", "not found", body)

    def _open(self, owner: str, name: str, rev: str, body: bool) -> _Repo | None:
        repo = self.hub._repo(owner, name)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found", body)
        elif repo.id in self.hub.gated:
            self._error(401, "GatedRepo", "Access to this repo is restricted", body)
        elif rev not in ("main", repo.sha):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", body)
        else:
            return repo
        return None

    def _api(self, owner: str, name: str, rest: list[str], body: bool) -> None:
        if rest[:1] == ["tree"] and len(rest) >= 2:
            repo = self._open(owner, name, rest[1], body)
            if repo is not None:
                sub = "/".join(rest[2:])
                files = [f for f in repo.files if not sub or f.startswith(sub + "/")]
                self._json([repo.entry(f) for f in files], body)
            return
        rev = rest[1] if rest[:1] == ["revision"] and len(rest) == 2 else "main"
        repo = self._open(owner, name, rev, body)
        if repo is not None:
            siblings = [{"rfilename": f} for f in repo.files]
            info = {"id": repo.id, "sha": repo.sha, "private": False, "siblings": siblings}
            self._json(info, body)

    def _resolve(self, owner: str, name: str, rev: str, file: str, body: bool) -> None:
        repo = self._open(owner, name, rev, body)
        if repo is None:
            return
        if file not in repo.files:
            self._error(404, "EntryNotFound", f"{file} does not exist", body, commit=repo.sha)
            return
        data = repo.read(file)
        entry = repo.entry(file)
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Repo-Commit", repo.sha)
        self.send_header("ETag", f'"{entry["oid"]}"')
        if "lfs" in entry:
            self.send_header("X-Linked-Etag", f'"{entry["lfs"]["oid"]}"')
            self.send_header("X-Linked-Size", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _json(self, obj: object, body: bool) -> None:
        data = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _error(self, status: int, code: str, msg: str, body: bool, commit: str | None = None):
        data = json.dumps({"error": msg}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", msg)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.end_headers()
        if body:
            self.wfile.write(data)


# --- helpers shared by test_hub.py and test_store.py -------------------------------------------

TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-6,
    "vocab_size": 256,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}


def _llama_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of mlx-lm's llama, in its (sanitized) naming."""
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}"
        shapes |= {
            f"{p}.self_attn.q_proj.weight": (h, h),
            f"{p}.self_attn.k_proj.weight": (kv, h),
            f"{p}.self_attn.v_proj.weight": (kv, h),
            f"{p}.self_attn.o_proj.weight": (h, h),
            f"{p}.mlp.gate_proj.weight": (i, h),
            f"{p}.mlp.up_proj.weight": (i, h),
            f"{p}.mlp.down_proj.weight": (h, i),
            f"{p}.input_layernorm.weight": (h,),
            f"{p}.post_attention_layernorm.weight": (h,),
        }
    shapes["model.norm.weight"] = (h,)
    if not c.get("tie_word_embeddings", True):
        shapes["lm_head.weight"] = (v, h)
    return shapes


def write_mlx_model(
    out: Path,
    *,
    bits: int | None = 4,
    group_size: int = 64,
    overrides: dict[str, int] | None = None,
    config: dict | None = None,
    metadata: dict | None = None,
) -> Path:
    """A tiny MLX llama as `mlxrun convert` / mlx-lm would leave it: config.json with a
    "quantization" section (per-layer `overrides` of bits included) and one safetensors file.
    bits=None writes an unquantized float16 model. Built with mlx alone (no mlx-lm import).
    """
    import mlx.core as mx

    config = {**TINY_LLAMA, **(config or {})}
    overrides = overrides or {}
    key = mx.random.key(0)
    weights: dict[str, mx.array] = {}
    section: dict = {"group_size": group_size, "bits": bits, "mode": "affine"}
    for name, shape in _llama_shapes(config).items():
        key, sub = mx.random.split(key)
        w = (0.02 * mx.random.normal(shape, key=sub)).astype(mx.float16)
        layer = name.removesuffix(".weight")
        if bits is None or len(shape) == 1:
            weights[name] = w
            continue
        layer_bits = overrides.get(layer, bits)
        if layer in overrides:
            section[layer] = {"group_size": group_size, "bits": layer_bits}
        wq, scales, biases = mx.quantize(w, group_size=group_size, bits=layer_bits)
        weights |= {name: wq, f"{layer}.scales": scales, f"{layer}.biases": biases}
    if bits is not None:
        config["quantization"] = section
        config["quantization_config"] = section
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "tokenizer_config.json").write_text("{}")
    if metadata is not None:
        (out / "mlxrun.json").write_text(json.dumps(metadata))
    return out


def hf_env(endpoint: str, hf_home: Path, *, offline: bool = False) -> dict[str, str]:
    """Environment for huggingface_hub: our endpoint, a private cache, online or offline."""
    return {
        "HF_ENDPOINT": endpoint,
        "HF_HOME": str(hf_home),
        "HF_HUB_OFFLINE": "1" if offline else "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }


# Variables that would otherwise override HF_HOME / HF_HUB_OFFLINE from hf_env.
_SHADOWING_VARS = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE", "HF_TOKEN")


@contextlib.contextmanager
def hub_env(endpoint: str, hf_home: Path, *, offline: bool = False) -> Iterator[None]:
    """Point the in-process huggingface_hub at `endpoint` / `hf_home` for the duration.

    huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE into `huggingface_hub.constants`
    once, at import. Reloading that module after setting the variables re-runs its own code, so
    every value derived from them (the resolve URL template, the cache path…) is recomputed the
    way huggingface_hub computes it; the same happens again after the variables are restored.
    """
    import importlib

    import pytest
    from huggingface_hub import constants

    try:
        with pytest.MonkeyPatch.context() as mp:
            for key in _SHADOWING_VARS:
                mp.delenv(key, raising=False)
            for key, value in hf_env(endpoint, hf_home, offline=offline).items():
                mp.setenv(key, value)
            importlib.reload(constants)
            yield
    finally:
        importlib.reload(constants)


def run_cli(*args: str, env: dict[str, str], stdin: str | None = None, timeout: float = 120):
    """Run the real `mlxrun` CLI in a subprocess (env vars are read there at import, as in use)."""
    full_env = {k: v for k, v in os.environ.items() if k not in _SHADOWING_VARS}
    full_env.pop("MLXRUN_DEBUG", None)
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-m", "mlxrun.cli", *args],
        env=full_env,
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        timeout=timeout,
    )
