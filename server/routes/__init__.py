"""The routes, one module per API family."""

from __future__ import annotations

from starlette.routing import Route

from . import anthropic, chat, completions, fim, models, ollama, ollama_models, ops, responses

routes = [
    Route("/v1/chat/completions", chat.create, methods=["POST"]),
    Route("/v1/completions", completions.create, methods=["POST"]),
    Route("/v1/models", models.list_models, methods=["GET"]),
    Route("/v1/models/{model_id:path}", models.get_model, methods=["GET"]),
    Route("/health", ops.health, methods=["GET"]),
    Route("/metrics", ops.metrics, methods=["GET"]),
    Route("/tokenize", ops.tokenize, methods=["POST"]),
    Route("/detokenize", ops.detokenize, methods=["POST"]),
    *fim.routes,
    *anthropic.routes,
    *ollama_models.routes,
    *ollama.routes,
    *responses.routes,
]
