"""The output-token budget: how many tokens one request may generate. The one owner of the rule.

    budget = output_budget(len(prompt_ids), params.max_tokens, context_length)
    params = params.replace(max_tokens=budget.granted)

The rule, for every front end (OpenAI, Anthropic, Ollama, FIM, the engine, generate and chat):
- a prompt that leaves no room in the context (prompt >= context) is a ContextLengthExceededError;
- no max_tokens: `default` if given, else what the context leaves (capped by `cap`);
- a max_tokens past what the context leaves (or past `cap`) is clamped to it, and the Budget says
  so (`clamped`); with `strict` it is an error instead (OpenAI rejects it with a 400).
"""

from __future__ import annotations

from dataclasses import dataclass

from mlxrun.errors import ContextLengthExceededError, InvalidRequestError

FALLBACK_MAX_TOKENS = 4096  # no max_tokens and no context length to bound it
# The longest reply `mlxrun generate` and `mlxrun chat` give when --max-tokens is not set (mlx-lm's
# generate caps at 256 too): a base model rarely stops by itself and would fill the whole context.
TERMINAL_MAX_TOKENS = 256
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's legacy /v1/completions default


@dataclass(frozen=True)
class Budget:
    granted: int  # tokens the request may generate (>= 1)
    requested: int | None  # what the caller asked for (None: nothing)

    @property
    def clamped(self) -> bool:
        return self.requested is not None and self.granted < self.requested

    def describe(self) -> str:
        """'requested->granted', the form the server's clamp header carries."""
        return f"{self.requested}->{self.granted}"


def max_output(context_length: int | None, cap: int | None = None) -> int | None:
    """The most one request can get: the context less a one-token prompt, and no more than cap."""
    if context_length is None:
        return cap
    room = max(1, context_length - 1)
    return room if cap is None else min(cap, room)


def chat_reply_default(context_length: int) -> int | None:
    """`mlxrun chat`'s reply cap with no --max-tokens: TERMINAL_MAX_TOKENS, and no more than half
    the context (the rest is the conversation's); None when the context has no room at all."""
    half = context_length // 2
    return min(TERMINAL_MAX_TOKENS, half) if half >= 1 else None


def prompt_room(context_length: int, requested: int | None, cap: int | None = None) -> int:
    """Prompt tokens a request may use when it can trim its own prompt (FIM's extra context):
    the context less the output it reserves, max_tokens or else a quarter of the context."""
    reserve = requested
    if reserve is None:
        reserve = context_length // 4 if cap is None else min(cap, context_length // 4)
    return context_length - reserve


def output_budget(
    prompt_tokens: int,
    requested: int | None,
    context_length: int | None,
    *,
    default: int | None = None,
    cap: int | None = None,
    strict: bool = False,
    param: str = "max_tokens",
    prompt_param: str = "prompt",
) -> Budget:
    """Tokens granted to a prompt of `prompt_tokens` asking for `requested` (None: unset).

    `param` / `prompt_param` name the client's fields in errors. Raises ContextLengthExceededError
    when the prompt alone leaves no room (always) or, with `strict`, when requested does not fit;
    InvalidRequestError when requested is below 1 or, with `strict`, above `cap`.
    """
    if requested is not None and requested < 1:
        raise InvalidRequestError(f"{param} must be at least 1, got {requested}", param=param)
    if context_length is not None and prompt_tokens >= context_length:
        raise ContextLengthExceededError(prompt_tokens, context_length, prompt_param)
    room = None if context_length is None else context_length - prompt_tokens
    bounds = [b for b in (room, cap) if b is not None]
    ceiling = min(bounds) if bounds else None
    if requested is None:
        wanted = default if default is not None else ceiling
        wanted = FALLBACK_MAX_TOKENS if wanted is None else wanted
        return Budget(wanted if ceiling is None else min(wanted, ceiling), None)
    if strict and context_length is not None and room is not None and requested > room:
        raise ContextLengthExceededError(prompt_tokens, context_length, param, requested)
    if strict and cap is not None and requested > cap:
        raise InvalidRequestError(
            f"{param} is {requested} but this server allows at most {cap} output tokens",
            param=param,
        )
    return Budget(requested if ceiling is None else min(requested, ceiling), requested)
