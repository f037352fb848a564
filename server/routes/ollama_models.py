"""The Ollama API's model listing and service endpoints (/api/tags, /api/show, /api/ps,
/api/version, `/`), the 501s for model management, and the edges every Ollama route shares:
errors as Ollama sends them and its timestamps. Chat and generate are in ollama.py."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from mlxrun import store
from mlxrun.parsing.reasoning import detect_reasoning

from ..common import in_thread
from ..errors import APIError, ollama_errors
from ..protocol_ollama import rfc3339, served_model, tagged
from ..state import ServerState, server_state

log = logging.getLogger("mlxrun.server")

# The Ollama release whose API this matches; clients gate features on it (VS Code needs >= 0.6.4).
OLLAMA_VERSION = "0.12.0"


def _facts(state: ServerState) -> dict[str, Any]:
    """What Ollama lists about a model, read once from its directory (config, safetensors
    headers). Blocking."""
    path = Path(getattr(state.tokenizer, "path", "") or ".")
    facts: dict[str, Any] = {"path": str(path), "config": {}, "size": 0, "count": 0, "quant": "unknown",
                             "modified": dt.datetime.now(dt.timezone.utc), "digest": ""}  # fmt: skip
    digest = hashlib.sha256()
    try:
        raw = (path / "config.json").read_bytes()
        digest.update(raw)
        facts["config"] = config = json.loads(raw)
        facts["modified"] = dt.datetime.fromtimestamp(
            (path / "config.json").stat().st_mtime, dt.timezone.utc
        )
        for f in sorted(path.glob("*.safetensors")):
            stat = f.stat()
            digest.update(f"{f.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        _, facts["count"], by_dtype = store.weight_stats(path, config)
        recipe = store.read_metadata(path).get("recipe")
        facts["quant"] = store.quantization_label(config, by_dtype, recipe)
        facts["size"] = store.weight_bytes(path)
    except (OSError, ValueError) as e:
        log.warning("cannot describe the model at %s for the Ollama API: %s", path, e)
    facts["digest"] = digest.hexdigest()
    return facts


async def _model_facts(request: Request) -> dict[str, Any]:
    cached = getattr(request.app.state, "ollama_facts", None)
    if cached is None:
        cached = request.app.state.ollama_facts = await in_thread(_facts, server_state(request))
    return cached


def _parameter_size(count: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f}{unit}"
    return str(count)


def _details(facts: dict[str, Any]) -> dict[str, Any]:
    family = str(facts["config"].get("model_type", "unknown"))
    return {
        "parent_model": "",
        "format": "mlx",
        "family": family,
        "families": [family],
        "parameter_size": _parameter_size(facts["count"]),
        "quantization_level": facts["quant"],
    }


def _entry(model_id: str, facts: dict[str, Any]) -> dict[str, Any]:
    name = tagged(model_id)
    return {
        "name": name,
        "model": name,
        "modified_at": rfc3339(facts["modified"]),
        "size": facts["size"],
        "digest": facts["digest"],
        "details": _details(facts),
    }


@ollama_errors
async def tags(request: Request) -> Response:
    state, facts = server_state(request), await _model_facts(request)
    return JSONResponse({"models": [_entry(i, facts) for i in state.config.model_ids]})


@ollama_errors
async def ps(request: Request) -> Response:
    state, facts = server_state(request), await _model_facts(request)
    if not state.ready:
        return JSONResponse({"models": []})
    forever = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=36500)  # never unloaded
    entry = {
        **_entry(state.config.model_id, facts),
        "expires_at": rfc3339(forever),
        "size_vram": facts["size"],  # unified memory: the weights are all on the GPU
        "context_length": state.config.context_length,
    }
    entry.pop("modified_at")
    return JSONResponse({"models": [entry]})


def _capabilities(state: ServerState) -> list[str]:
    caps = ["completion"]
    if state.tool_format is not None:
        caps.append("tools")
    if state.tokenizer.fim_tokens is not None:
        caps.append("insert")
    if _thinks(state):
        caps.append("thinking")
    return caps


def _thinks(state: ServerState) -> bool:
    """Whether the model writes reasoning the pipeline splits out (its vocab or template knows
    the markers)."""
    return detect_reasoning(state.tokenizer) is not None


def _model_info(state: ServerState, model_id: str, facts: dict[str, Any]) -> dict[str, Any]:
    config, arch = facts["config"], _details(facts)["family"]
    info: dict[str, Any] = {
        "general.architecture": arch,
        "general.basename": model_id,
        "general.parameter_count": facts["count"],
        f"{arch}.context_length": state.config.context_length,
    }
    for key, name in (("hidden_size", "embedding_length"), ("num_hidden_layers", "block_count"),
                      ("intermediate_size", "feed_forward_length"), ("vocab_size", "vocab_size"),
                      ("num_attention_heads", "attention.head_count"),
                      ("num_key_value_heads", "attention.head_count_kv")):  # fmt: skip
        if isinstance(config.get(key), int):
            info[f"{arch}.{name}"] = config[key]
    return info


@ollama_errors
async def show(request: Request) -> Response:
    state = server_state(request)
    body = await state.read_json(request)
    model_id = served_model(state.config.model_ids, body.get("model") or body.get("name"))
    facts = await _model_facts(request)
    ctx = state.config.context_length
    template = state.tokenizer.chat_template or ""
    capabilities = await in_thread(_capabilities, state)
    return JSONResponse(
        {
            "license": "",
            "modelfile": f"# Served by mlxrun\nFROM {facts['path']}\nPARAMETER num_ctx {ctx}\n",
            "parameters": f"num_ctx {ctx}",
            "template": template,
            "details": _details(facts),
            "model_info": _model_info(state, model_id, facts),
            "capabilities": capabilities,
            "modified_at": rfc3339(facts["modified"]),
        }
    )


@ollama_errors
async def version(request: Request) -> Response:
    from mlxrun import __version__

    return JSONResponse({"version": OLLAMA_VERSION, "mlxrun_version": __version__})


async def root(request: Request) -> Response:
    return PlainTextResponse("Ollama is running")


@ollama_errors
async def unsupported(request: Request) -> Response:
    path = request.url.path
    if path in _NAMED_MODEL_PATHS:
        # An unserved name is a 404 like everywhere else (never a lookup on disk or the Hub).
        state = server_state(request)
        body = await state.read_json(request)
        served_model(state.config.model_ids, body.get("model") or body.get("name"))
    if path.startswith("/api/embed"):
        message = "mlxrun serves a generative model; embeddings are not supported."
    else:
        message = (
            f"{path} is not supported: mlxrun serves the one model it was started with. "
            "Manage models with `mlxrun pull` / `mlxrun list` and restart `mlxrun serve`."
        )
    raise APIError(501, message, code="not_implemented")


_NAMED_MODEL_PATHS = frozenset({"/api/pull", "/api/push", "/api/delete"})

routes: list[Route] = [
    Route("/", root, methods=["GET", "HEAD"]),
    Route("/api/version", version, methods=["GET"]),
    Route("/api/tags", tags, methods=["GET"]),
    Route("/api/ps", ps, methods=["GET"]),
    Route("/api/show", show, methods=["POST"]),
    Route("/api/embed", unsupported, methods=["POST"]),
    Route("/api/embeddings", unsupported, methods=["POST"]),
    *(
        Route(f"/api/{p}", unsupported, methods=["POST"])
        for p in ("pull", "push", "create", "copy")
    ),
    Route("/api/delete", unsupported, methods=["DELETE"]),
]
