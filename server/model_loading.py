"""Blocking halves of the model pool (server/models_pool.py), run on worker threads: what a model
will be charged before it loads, and loading it onto a started engine."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

MIN_CONTEXT = 16  # below this a model is refused rather than squeezed into the budget
# Each model's KV budget holds this many full contexts (Ollama's num_ctx x num_parallel): requests
# reserve prompt + max_tokens, so with one context they would run one at a time.
PARALLEL_CONTEXTS = 4


@dataclass(frozen=True)
class Estimate:
    """What a model will hold at its peak: weights, its KV budget, its prefix cache."""

    weights_bytes: int
    kv_bytes: int  # PARALLEL_CONTEXTS contexts' worth, or what the budget leaves
    cache_bytes: int
    context: int  # what fits beside the weights and the cache, at most the model's own

    @property
    def nbytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.cache_bytes


def estimate(spec: Any, settings: Any, budget_bytes: int) -> Estimate:
    """The charge for `spec` (reads config.json and the safetensors headers, no tensor data).
    The context shrinks to what the budget can hold, so a prompt that can never fit is a 400
    context_length_exceeded rather than an allocation failure mid-request."""
    from mlxrun import hfconfig, hub, store
    from mlxrun.loader import DEFAULT_CONTEXT, model_info

    path = store.resolve_model(spec.path, progress=False)
    config = hfconfig.normalize(hub.read_config(path))
    context = spec.context or store.context_length(config) or DEFAULT_CONTEXT
    info = model_info(spec.name, path, config, context)
    cache = settings.engine.cache_memory_bytes if settings.engine is not None else 0
    per_token = max(1, info.kv_bytes_per_token)
    room = max(0, budget_bytes - info.weights_bytes - cache) // per_token  # KV tokens that fit
    if room < context:
        context = max(MIN_CONTEXT, room)  # past the budget if even this won't fit
    tokens = max(context, min(room, context * PARALLEL_CONTEXTS))
    return Estimate(info.weights_bytes, per_token * tokens, cache, int(context))


def load_engine(spec: Any, est: Estimate, template: Any) -> tuple[Any, Any, Any]:
    """(started engine, tokenizer, info). The governor has made room already, so the loader's
    own machine-wide check is skipped; the engine's KV is capped at the charged budget."""
    import mlx.core as mx

    from mlxrun.engine import Engine, EngineConfig
    from mlxrun.loader import load
    from mlxrun.safety import check_chat_template

    model, tokenizer, info = load(spec.path, context=est.context, force=True)
    problem = check_chat_template(tokenizer)
    if problem:  # said at load, before any client gets a 400 for it
        logging.getLogger("mlxrun.server").warning("%s: %s", spec.name, problem)
    mx.eval(model.parameters())  # lazy weights belong to this thread; the engine starts elsewhere
    config = dataclasses.replace(
        template or EngineConfig(),
        eos_token_ids=tuple(sorted(tokenizer.eos_token_ids)),
        namespace=spec.name,
        context_length=info.context_length,
        kv_memory_bytes=est.kv_bytes,
        kv_capacity_tokens=None,
        cache_memory_bytes=est.cache_bytes,
    )
    if getattr(spec, "draft", None):  # --draft or models.toml: same tokenizer or a typed error
        from mlxrun.draft import load_draft

        draft = load_draft(spec.draft, tokenizer, context=est.context)
        config = dataclasses.replace(
            config, speculate=dataclasses.replace(config.speculate, draft=draft)
        )
    engine = Engine(model, config)
    engine.start()
    return engine, tokenizer, info
