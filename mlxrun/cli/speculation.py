"""Speculation flags shared by `serve`, `generate` and `chat`.

    @speculation_options
    def cmd(..., speculate, draft, num_speculative_tokens): ...
        loaded = load_draft(draft, tokenizer) if draft else None   # mlxrun.draft
        EngineConfig(..., **speculation_overrides(speculate, num_speculative_tokens, loaded))

--speculate ngram proposes from the request's own prompt and output (prompt lookup); --draft
MODEL loads a small model with the same tokenizer to propose; requests with an OpenAI
`prediction` speculate on it whatever the flags. k adapts per request (mlxrun.speculate).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click


def speculation_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--num-speculative-tokens", type=click.IntRange(1, 16), default=5,
                      show_default=True,
                      help="Most tokens proposed per request and step (fewer while they are "
                      "rejected).")(fn)  # fmt: skip
    fn = click.option("--draft", default=None, metavar="MODEL",
                      help="A small model with the same tokenizer that proposes tokens for the "
                      "target to verify (the output is unchanged).")(fn)  # fmt: skip
    return click.option("--speculate", type=click.Choice(["off", "ngram"]), default="off",
                        show_default=True,
                        help="ngram: propose tokens copied from the prompt and output (prompt "
                        "lookup; code edits and refactors).")(fn)  # fmt: skip


def speculation_overrides(speculate: str, k: int, draft: Any = None) -> dict[str, Any]:
    """EngineConfig fields for the flags (`draft`: a loaded mlxrun.draft.Draft, or None)."""
    from mlxrun.spec_step import SpecConfig

    mode = None if speculate == "off" else speculate
    return {"speculate": SpecConfig(mode=mode, max_k=k, draft=draft)}


def pop_speculation(options: dict[str, Any]) -> tuple[str, str | None, int]:
    """Take the speculation flags out of a command's catch-all keyword arguments."""
    return (options.pop("speculate"), options.pop("draft"), options.pop("num_speculative_tokens"))


def speculation_for(tokenizer: Any, flags: tuple, context: int | None) -> dict[str, Any]:
    """EngineConfig fields for popped flags; loads the draft (IncompatibleDraftError when its
    tokenizer is not the target's)."""
    speculate, draft, k = flags
    loaded = None
    if draft is not None:
        from mlxrun.draft import load_draft

        loaded = load_draft(draft, tokenizer, context=context)
    return speculation_overrides(speculate, k, loaded)
