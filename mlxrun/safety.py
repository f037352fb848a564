"""Model files are untrusted input: checks that run before they size memory or reach a client.

- `check_config`: the sizes config.json claims (layers, vocabulary, widths, experts) are
  range-checked before they size any allocation; an absurd value is ImplausibleConfigError.
- `check_chat_template`: the chat template (rendered in transformers' Jinja sandbox) is tried
  once on a sample conversation at load, so an unsafe or broken template is reported naming its
  file before a client gets a 400 for it.

Safetensors headers are bounded in mlxrun.hub (MAX_HEADER_BYTES) before they are parsed, and the
loader checks every header against the file size before mlx maps a tensor.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlxrun.errors import CorruptCheckpointError, InvalidRequestError

if TYPE_CHECKING:
    from mlxrun.tokenizer import Tokenizer


class ImplausibleConfigError(CorruptCheckpointError):
    """config.json claims a size no real model has (a broken or hostile file)."""

    hint = "This config.json is not a real model's; re-download it from a source you trust."


# Upper bounds far above any released model (the largest have ~128 layers, a 262k vocabulary,
# a 32k hidden size, 256 experts), far below sizes that could exhaust memory when allocated.
LIMITS: dict[str, int] = {
    "num_hidden_layers": 1 << 12,
    "n_layer": 1 << 12,
    "num_layers": 1 << 12,
    "vocab_size": 1 << 23,
    "hidden_size": 1 << 17,
    "n_embd": 1 << 17,
    "intermediate_size": 1 << 20,
    "moe_intermediate_size": 1 << 20,
    "num_attention_heads": 1 << 12,
    "num_key_value_heads": 1 << 12,
    "head_dim": 1 << 14,
    "num_experts": 1 << 14,
    "num_local_experts": 1 << 14,
    "n_routed_experts": 1 << 14,
    "num_experts_per_tok": 1 << 10,
    "max_position_embeddings": 1 << 28,
    "sliding_window": 1 << 28,
}
_NESTED = ("text_config", "language_config")
# Fields where 0 means "none" (a dense model's expert count, no sliding window).
_ZERO_OK = frozenset({"num_experts", "num_local_experts", "n_routed_experts", "num_experts_per_tok",
                      "moe_intermediate_size", "sliding_window"})  # fmt: skip


def check_config(config: Mapping[str, Any], source: str = "config.json") -> None:
    """Raise ImplausibleConfigError when a size field is not an integer in its range."""
    sections = [("", config)]
    sections += [(f"{k}.", config[k]) for k in _NESTED if isinstance(config.get(k), Mapping)]
    for prefix, section in sections:
        for key, limit in LIMITS.items():
            value = section.get(key)
            if value is None:
                continue
            low = 0 if key in _ZERO_OK else 1
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= limit:
                raise ImplausibleConfigError(
                    f"{source}: {prefix}{key} = {value!r} is out of range "
                    f"(an integer from {low} to {limit} is expected)"
                )


# ---------------------------------------------------------------- chat templates

SAMPLE_CONVERSATION = (
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello!"},
    {"role": "assistant", "content": "Hi. How can I help?"},
    {"role": "user", "content": "What is 2 + 2?"},
)


def template_file(path: Path) -> str:
    """Where a checkpoint keeps its chat template (the file transformers read it from)."""
    for name in ("chat_template.jinja", "chat_template.json"):
        if (path / name).is_file():
            return str(path / name)
    return str(path / "tokenizer_config.json")


def _is_unsafe(exc: BaseException) -> bool:
    from jinja2.sandbox import SecurityError

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, SecurityError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def check_chat_template(tokenizer: Tokenizer) -> str | None:
    """One line describing an unsafe or broken chat template, or None when it renders a sample
    conversation (or the model has none). Templates that reject a system turn are tried on
    the user/assistant turns alone: that is a rule of the model, not a broken file."""
    if not getattr(tokenizer, "has_chat_template", False):
        return None
    failure: InvalidRequestError | None = None
    for messages in (SAMPLE_CONVERSATION, SAMPLE_CONVERSATION[1:]):
        try:
            tokenizer.apply_chat_template(list(messages))
            return None
        except InvalidRequestError as e:
            failure = failure or e
            if _is_unsafe(e):
                break
    assert failure is not None
    where = template_file(Path(getattr(tokenizer, "path", ".")))
    if _is_unsafe(failure):
        return (
            f"the chat template in {where} is unsafe: the sandbox stopped it "
            f"({failure.message}); every chat request will be refused"
        )
    return f"the chat template in {where} is broken: {failure.message}"
