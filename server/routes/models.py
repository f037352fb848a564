"""GET /v1/models and /v1/models/{id}: the served model (and its aliases) with capabilities."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from mlxrun.budget import max_output

from ..errors import guarded, model_not_found
from ..state import ServerState, server_state


def model_card(state: ServerState, model_id: str) -> dict[str, Any]:
    config = state.config
    # What one request can really get: the context less a one-token prompt (mlxrun.budget).
    most = max_output(config.context_length, config.max_output_tokens)
    return {
        "id": model_id,
        "object": "model",
        "created": config.created,
        "owned_by": config.owned_by,
        # Beyond OpenAI's four fields: what editors and clients need to size their requests.
        "context_length": config.context_length,
        "max_model_len": config.context_length,
        "max_output_tokens": most,
        "capabilities": {
            "chat": True,
            "completions": True,
            "fim": state.tokenizer.fim_tokens is not None,
            "tools": state.tool_format is not None,
            "json_schema": True,
            "reasoning": state.reasoning_format is not None,
            "logprobs": True,
            "vision": False,
        },
    }


def _pool_card(hub: ServerState, model_id: str) -> dict[str, Any]:
    """A servable model of the pool: the full card while it is loaded, else the basics."""
    assert hub.pool is not None
    spec = hub.pool.find(model_id)
    slot = hub.pool.slots.get(spec.name)
    if slot is not None:
        return model_card(slot.state, model_id)
    card = {"id": model_id, "object": "model", "created": hub.config.created,
            "owned_by": hub.config.owned_by, "loaded": False}  # fmt: skip
    if spec.context:
        card["context_length"] = card["max_model_len"] = spec.context
    return card


@guarded
async def list_models(request: Request) -> JSONResponse:
    state = server_state(request)
    if state.pool is not None:
        data = [_pool_card(state, model_id) for model_id in state.pool.model_ids]
        return JSONResponse({"object": "list", "data": data})
    data = [model_card(state, model_id) for model_id in state.config.model_ids]
    return JSONResponse({"object": "list", "data": data})


@guarded
async def get_model(request: Request) -> JSONResponse:
    state = server_state(request)
    model_id = request.path_params["model_id"]
    if state.pool is not None:
        return JSONResponse(_pool_card(state, model_id))
    if model_id not in state.config.model_ids:
        raise model_not_found(model_id, state.config.model_ids)
    return JSONResponse(model_card(state, model_id))
