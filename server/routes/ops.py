"""Operations: GET /health, GET /metrics (Prometheus text), POST /tokenize, POST /detokenize."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from .. import errors, pool_metrics
from ..common import in_thread
from ..errors import guarded, invalid
from ..extras import note, reports
from ..models_pool import use_model
from ..protocol_ops import parse_detokenize, parse_tokenize
from ..state import ServerState, server_state

PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@guarded
async def health(request: Request) -> Response:
    state = server_state(request)
    if state.ready and (state.pool is not None or state.engine.is_alive):
        return JSONResponse({"status": "ok", "model": state.config.model_id})
    if state.ready:  # started, then the engine thread went away: not healthy any more
        err = errors.APIError(
            503, "The engine has stopped", type=errors.SERVER, code="engine_stopped"
        )
        return JSONResponse({"status": "error", **err.body()}, status_code=503)
    if state.load_error is not None:
        err = errors.APIError(
            503,
            f"The model failed to start: {state.load_error}",
            type=errors.SERVER,
            code="model_failed",
        )
        return JSONResponse({"status": "error", **err.body()}, status_code=503)
    err = errors.loading()
    return JSONResponse({"status": "loading", **err.body()}, status_code=503, headers=err.headers)


def _engine_gauges(state: ServerState) -> dict[str, tuple[str, float]]:
    if state.pool is not None:
        stats: dict[str, Any] = pool_metrics.engine_stats(state.pool)
    else:
        stats = state.engine.stats() if state.ready else {}
    hit, computed = stats.get("cache_hit_tokens", 0), stats.get("prompt_tokens", 0)
    gauges = {
        "queue_depth": ("Requests waiting for a slot in the engine.", stats.get("waiting", 0)),
        "requests_running": ("Requests in the running batch.", stats.get("running", 0)),
        "prefix_cache_hit_ratio": (
            "Share of prompt tokens served from the prefix cache (since start).",
            hit / (hit + computed) if hit + computed else 0.0,
        ),
        "prefix_cache_bytes": (
            "Bytes held by the prefix cache (memory tier).",
            stats.get("cache_memory_bytes", 0),
        ),
        "kv_tokens_reserved": (
            "KV tokens reserved by running requests.",
            stats.get("kv_tokens_reserved", 0),
        ),
        "reused_chunk_tokens": (
            "Prompt tokens reused past the prefix by --cache-reuse (since start).",
            stats.get("reuse_chunk_tokens", 0),
        ),
        "generation_tokens_per_second": (
            "Recent engine generation rate (all requests).",
            stats.get("generation_tokens_per_s", 0.0),
        ),
    }
    for kind in ("full", "8bit", "4bit"):  # --kv-bits: sequences by the precision of their KV
        gauges[f"kv_sequences_{kind}"] = (
            f"Sequences in the engine whose KV is held at {kind} precision.",
            stats.get(f"kv_sequences_{kind}", 0),
        )
    gauges["kv_cache_bits"] = (
        "Bits per KV value that new KV gets now.",
        stats.get("kv_bits_now", 0),
    )
    gauges["speculation_acceptance_rate"] = (
        "Share of proposed tokens (prediction, n-gram, draft) the model accepted (since start).",
        stats.get("spec_acceptance_rate", 0.0),
    )
    gauges["speculation_tokens_per_step"] = (
        "Tokens a speculating request gets per verify step: accepted ones plus one.",
        stats.get("spec_tokens_per_row_step", 0.0),
    )
    gauges.update(_memory_gauges())
    return gauges


def _memory_gauges() -> dict[str, tuple[str, float]]:
    import mlx.core as mx
    import psutil

    return {
        "memory_active_bytes": (
            "MLX memory in use (weights, KV, buffers).",
            mx.get_active_memory(),
        ),
        "memory_peak_bytes": ("Peak MLX memory since start.", mx.get_peak_memory()),
        "memory_cache_bytes": ("MLX allocator cache (free buffers kept).", mx.get_cache_memory()),
        "process_resident_memory_bytes": (
            "Resident memory of the server process.",
            psutil.Process().memory_info().rss,
        ),
    }


@guarded
async def metrics(request: Request) -> Response:
    state = server_state(request)
    text = state.metrics.render(_engine_gauges(state))
    if state.pool is not None:
        text += pool_metrics.render(state.pool)
    return PlainTextResponse(text, media_type=PROMETHEUS_TYPE)


@guarded
@reports
async def tokenize(request: Request) -> Response:
    """vLLM's {prompt | messages} or llama-server's {content, add_special, with_pieces}."""
    state = server_state(request)
    req = parse_tokenize(await state.read_json(request), strict=state.config.strict)
    note(request, req.ignored)
    state = await use_model(request, req.model)
    tokenizer = state.tokenizer
    if req.messages is not None:
        ids = await in_thread(tokenizer.apply_chat_template, req.messages)
    else:
        ids = await in_thread(
            tokenizer.encode, req.prompt, add_special_tokens=req.add_special_tokens
        )
    tokens: list[Any] = ids
    if req.with_pieces:
        tokens = [{"id": i, "piece": state.token_texts.get(i)[0]} for i in ids]
    return JSONResponse(
        {"tokens": tokens, "count": len(ids), "max_model_len": state.config.context_length}
    )


@guarded
@reports
async def detokenize(request: Request) -> Response:
    state = server_state(request)
    model, tokens, ignored = parse_detokenize(
        await state.read_json(request), strict=state.config.strict
    )
    note(request, ignored)
    state = await use_model(request, model)
    vocab = state.tokenizer.vocab_size
    bad = next((t for t in tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise invalid(f"Token id {bad} is outside the vocabulary (0..{vocab - 1}).", "tokens")
    text = await in_thread(state.tokenizer.decode, tokens)
    return JSONResponse({"prompt": text, "content": text})  # vLLM's name, llama-server's
