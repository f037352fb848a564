"""Fill-in-the-middle request bodies: Mistral's /v1/fim/completions and llama.cpp's /infill (their
routes are in routes/fim.py). Errors name the body's own fields; llama.cpp's options keep its
defaults and names. Fields either dialect does not use are reported (server/extras.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mlxrun.errors import InvalidRequestError
from mlxrun.sampling import SamplingParams

from .errors import from_mlxrun, invalid
from .extras import Extras
from .protocol import (
    check_kind,
    optional,
    parse_logit_bias,
    parse_stop,
    required,
    unrecognized,
)


def _stops(body: dict[str, Any]) -> tuple[str, ...]:
    """`stop` as OpenAI parses it; the FIM dialects drop empty strings."""
    return tuple(s for s in parse_stop(body) if s)


def _params(given: dict[str, Any], names: dict[str, str]) -> SamplingParams:
    """SamplingParams from `given`; errors name the body field (`names`: ours -> the body's)."""
    try:
        return SamplingParams(**given)
    except InvalidRequestError as e:
        err = from_mlxrun(e)
        if err.param in names:
            err.param = names[err.param]
            err.message = f"Invalid value for '{err.param}': {e.message}"
        raise err from None


def _text(body: dict[str, Any], name: str) -> str:
    return optional(body, name, "string", "")


# ---------------------------------------------------------------- Mistral: /v1/fim/completions

_MISTRAL_KEYS = frozenset({
    "model", "prompt", "suffix", "max_tokens", "max_completion_tokens", "min_tokens", "stream",
    "stop", "random_seed", "seed", "temperature", "top_p", "top_k", "min_p", "presence_penalty",
    "frequency_penalty", "repetition_penalty", "repetition_context_size", "metadata", "user",
})  # fmt: skip
_MISTRAL_SAMPLING = (
    "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "repetition_context_size",
)  # fmt: skip
_MISTRAL_ALIASES = (
    ("max_tokens", "max_completion_tokens"), ("max_tokens", "max_tokens"),
    ("seed", "random_seed"), ("seed", "seed"),
)  # fmt: skip


@dataclass(frozen=True)
class MistralFim:
    model: str
    prompt: str
    suffix: str
    params: SamplingParams
    stream: bool
    max_param: str  # the field the client used, for error messages
    ignored: list[str]  # fields accepted but not acted on


def parse_mistral(body: dict[str, Any], strict: bool = False) -> MistralFim:
    extras = Extras(strict)
    extras.check(body, _MISTRAL_KEYS, unrecognized)
    model, prompt = required(body, "model", "string"), required(body, "prompt", "string")
    optional(body, "user", "string"), optional(body, "metadata", "object")  # unused, but typed
    min_tokens = optional(body, "min_tokens", "integer", 0)
    if min_tokens != 0:
        why = "must be at least 0" if min_tokens < 0 else "above 0 is not supported yet"
        raise invalid(f"'min_tokens' {why}, got {min_tokens}.", "min_tokens")
    given = {k: body[k] for k in _MISTRAL_SAMPLING if body.get(k) is not None}
    names = {"max_tokens": "max_tokens", "seed": "random_seed"}
    for ours, theirs in _MISTRAL_ALIASES:  # the first one set wins
        if ours not in given and body.get(theirs) is not None:
            given[ours], names[ours] = body[theirs], theirs
    return MistralFim(
        model=model,
        prompt=prompt,
        suffix=_text(body, "suffix"),
        params=_params({**given, "stop": _stops(body)}, names),
        stream=optional(body, "stream", "boolean", False),
        max_param=names["max_tokens"],
        ignored=extras.paths,
    )


# ---------------------------------------------------------------- llama.cpp: /infill

_REFUSED = ("grammar", "json_schema", "n_probs")  # would change the output: never dropped silently
_LLAMA_NAMES = {"repetition_penalty": "repeat_penalty", "repetition_context_size": "repeat_last_n"}
_INFILL_KEYS = frozenset({
    "model", "n_predict", "max_tokens", "seed", "top_p", "repeat_last_n", "temperature", "top_k",
    "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty", "ignore_eos", "stop",
    "logit_bias", "response_fields", "stream", "input_prefix", "prompt", "input_suffix",
    "input_extra", "t_max_predict_ms", "cache_prompt", *_REFUSED,
})  # fmt: skip
# llama.cpp options editors send that change nothing here, or nothing we do: reported, not refused.
_LLAMA_NO_EFFECT = frozenset({
    "id_slot", "samplers", "n_indent", "t_max_prompt_ms", "n_keep", "typical_p", "dynatemp_range",
    "dynatemp_exponent", "mirostat", "mirostat_tau", "mirostat_eta", "xtc_probability",
    "xtc_threshold", "dry_multiplier", "dry_base", "dry_allowed_length", "dry_penalty_last_n",
    "dry_sequence_breakers", "return_tokens", "timings_per_token", "post_sampling_probs",
})  # fmt: skip
_SETTINGS = (
    "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "repetition_context_size",
    "presence_penalty", "frequency_penalty", "seed", "ignore_eos",
)  # fmt: skip


@dataclass(frozen=True)
class Infill:
    prefix: str  # input_prefix + prompt: all text before the cursor
    suffix: str
    extra: list[tuple[str, str]]  # (filename, text)
    params: SamplingParams  # max_tokens None: whatever the context leaves
    n_predict: int  # as sent: -1 unlimited; 0 a warm-up (evaluate the prompt, return nothing)
    stream: bool
    time_limit_s: float  # t_max_predict_ms; 0: none
    fields: list[str] | None  # response_fields
    settings: dict[str, Any]  # echoed as generation_settings
    ignored: list[str]  # fields accepted but not acted on


def _extra(body: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for i, chunk in enumerate(optional(body, "input_extra", "array", [])):
        check_kind(chunk, "object", f"input_extra[{i}]")
        for name in ("filename", "text"):
            if chunk.get(name) is not None:
                check_kind(chunk[name], "string", f"input_extra[{i}].{name}")
        out.append((chunk.get("filename") or "tmp", chunk.get("text") or ""))
    return out


def _infill_extras(body: dict[str, Any], strict: bool) -> Extras:
    """llama.cpp's options we do not act on are reported; unknown ones too (refused if strict)."""
    extras = Extras(strict)
    for name, value in body.items():
        if value is None or name in _INFILL_KEYS:
            continue
        if name in _LLAMA_NO_EFFECT:
            extras.ignore(name)
        else:
            extras.unknown(name, unrecognized(name))
    if optional(body, "cache_prompt", "boolean", True) is False:
        extras.ignore("cache_prompt")  # the prefix cache is always on; the text is the same
    return extras


def parse_infill(body: dict[str, Any], context_length: int, strict: bool = False) -> Infill:
    """llama.cpp's options and defaults; options it has and we do not need are ignored (and
    reported), as llama.cpp ignores what it does not know."""
    extras = _infill_extras(body, strict)
    for name in _REFUSED:
        if body.get(name):
            raise invalid(f"'{name}' is not supported on /infill.", name, "unsupported_parameter")
    if body.get("model") is not None:
        check_kind(body["model"], "string", "model")  # any name: one model is served
    n_name = "n_predict" if body.get("n_predict") is not None else "max_tokens"
    n_predict = optional(body, n_name, "integer", -1)
    seed = optional(body, "seed", "integer", -1)
    top_p = optional(body, "top_p", "number", 0.95)
    last_n = optional(body, "repeat_last_n", "integer", 64)
    given = {
        "temperature": max(0.0, optional(body, "temperature", "number", 0.8)),  # <= 0: greedy
        "top_k": max(0, optional(body, "top_k", "integer", 40)),
        "top_p": min(1.0, top_p),
        "min_p": optional(body, "min_p", "number", 0.05),
        "repetition_penalty": optional(body, "repeat_penalty", "number", 1.0) if last_n else 1.0,
        "repetition_context_size": context_length if last_n < 0 else max(1, last_n),
        "presence_penalty": optional(body, "presence_penalty", "number", 0.0),
        "frequency_penalty": optional(body, "frequency_penalty", "number", 0.0),
        "seed": None if seed < 0 or seed == 0xFFFFFFFF else seed,  # llama.cpp's "random"
        "ignore_eos": optional(body, "ignore_eos", "boolean", False),
        "stop": _stops(body),
        "logit_bias": parse_logit_bias(body, llama=True),
        "max_tokens": None if n_predict < 0 else max(1, n_predict),  # a warm-up samples one
    }
    params = _params(given, {**_LLAMA_NAMES, "max_tokens": n_name})
    fields = optional(body, "response_fields", "array")
    for f in fields or ():
        check_kind(f, "string", "response_fields")
    stream = optional(body, "stream", "boolean", False)
    settings = {_LLAMA_NAMES.get(k, k): given[k] for k in _SETTINGS}
    return Infill(
        prefix=_text(body, "input_prefix") + _text(body, "prompt"),
        suffix=_text(body, "input_suffix"),
        extra=_extra(body),
        params=params,
        n_predict=n_predict,
        stream=stream,
        time_limit_s=max(0, optional(body, "t_max_predict_ms", "integer", 0)) / 1000,
        fields=fields,
        settings={**settings, "n_predict": n_predict, "stop": list(params.stop), "stream": stream},
        ignored=extras.paths,
    )
