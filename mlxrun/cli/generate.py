"""`mlxrun generate MODEL -p TEXT`: one completion streamed to stdout, statistics to stderr."""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from mlxrun.cli.common import friendly_errors

DEFAULT_TEMPERATURE = 0.7
# The longest reply `generate` and `chat` give when --max-tokens is not set (mlx-lm's generate caps
# at 256 too): a base model rarely stops by itself, and would otherwise fill the whole context.
DEFAULT_MAX_TOKENS = 256

# SamplingParams field -> the flag that sets it, so errors name what the user typed.
_FLAGS = {
    "temperature": "--temperature",
    "top_p": "--top-p",
    "top_k": "--top-k",
    "min_p": "--min-p",
    "repetition_penalty": "--repetition-penalty",
    "presence_penalty": "--presence-penalty",
    "frequency_penalty": "--frequency-penalty",
    "seed": "--seed",
    "max_tokens": "--max-tokens",
    "stop": "--stop",
}


def read_prompt(prompt: str) -> str:
    """The prompt text; "-" reads stdin, which must be UTF-8. InvalidRequestError otherwise."""
    from mlxrun.errors import InvalidRequestError

    if prompt == "-":
        data = sys.stdin.buffer.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidRequestError(
                f"stdin is not UTF-8 text (invalid byte at offset {e.start})",
                param="prompt",
                hint="Pipe a UTF-8 text file, e.g. `iconv -t UTF-8 FILE | mlxrun generate MODEL -p -`.",
            ) from None
    else:
        text = prompt
        try:
            text.encode("utf-8")  # undecodable argv bytes arrive as lone surrogates
        except UnicodeEncodeError:
            raise InvalidRequestError(
                "the prompt is not valid UTF-8 text", param="prompt", hint="Pass UTF-8 text to -p."
            ) from None
    if not text:
        raise InvalidRequestError(
            "the prompt is empty",
            param="prompt",
            hint="Pass some text with -p (or -p - for stdin).",
        )
    return text


def sampling_params(**values: Any) -> Any:
    """SamplingParams from the flags that were given; errors name the flag."""
    from mlxrun.errors import InvalidRequestError
    from mlxrun.sampling import SamplingParams

    given = {k: v for k, v in values.items() if v is not None}
    try:
        return SamplingParams(**given)
    except InvalidRequestError as e:
        flag = _FLAGS.get(e.param or "", e.param)
        raise InvalidRequestError(
            f"{flag}: {e.message}", param=e.param, hint=f"Fix the value of {flag} and try again."
        ) from None


def default_max_tokens(room: int) -> int | None:
    """DEFAULT_MAX_TOKENS, or fewer when only `room` tokens are left for the reply (None when
    none are: the context check then reports the prompt as too long)."""
    return min(DEFAULT_MAX_TOKENS, room) if room >= 1 else None


def note_fallback_template(tokenizer: Any) -> None:
    """One line on stderr when the model has no chat template and the plain fallback stands in."""
    from mlxrun.tokenizer import FALLBACK_NOTICE

    if not tokenizer.has_chat_template:
        click.echo(FALLBACK_NOTICE, err=True)


def _prompt_ids(tokenizer: Any, text: str, chat: bool, system: str | None) -> list[int]:
    if not chat:
        return tokenizer.encode(text)
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": text})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def _stats_line(chunk: Any) -> str:
    return (
        f"prompt: {chunk.prompt_tokens} tokens, {chunk.prompt_tps:.1f} tok/s | "
        f"generation: {chunk.generation_tokens} tokens, {chunk.generation_tps:.1f} tok/s | "
        f"peak memory: {chunk.peak_memory_gb:.3f} GB | finish: {chunk.finish_reason}"
    )


def _stream(chunks: Any) -> Any:
    """Write each chunk's text as it comes; returns the last chunk."""
    last, wrote_text, ends_newline = None, False, False
    out = sys.stdout
    for chunk in chunks:
        last = chunk
        if chunk.text:
            out.write(chunk.text)
            out.flush()
            wrote_text, ends_newline = True, chunk.text.endswith("\n")
    if wrote_text and not ends_newline and out.isatty():
        out.write("\n")  # keep the shell prompt (and the stats line) off the output's last line
    out.flush()
    return last


@click.command("generate")
@click.argument("model")
@click.option("-p", "--prompt", required=True, help="The prompt text, or - to read it from stdin.")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the model's chat template.")
@click.option("--system", default=None, help="System message (with --chat).")
@click.option("--max-tokens", type=int, default=None, help=f"Stop after this many tokens [default: {DEFAULT_MAX_TOKENS}, or what the context has left].")  # fmt: skip
@click.option("--temperature", type=float, default=DEFAULT_TEMPERATURE, show_default=True, help="0 is greedy.")  # fmt: skip
@click.option("--top-p", type=float, default=None, help="Nucleus sampling mass in (0, 1].")
@click.option("--top-k", type=int, default=None, help="Keep the k most likely tokens (0: off).")
@click.option("--min-p", type=float, default=None, help="Drop tokens below min-p x the top one.")
@click.option("--repetition-penalty", type=float, default=None, help="> 1 discourages repeats.")
@click.option("--presence-penalty", type=float, default=None, help="-2..2.")
@click.option("--frequency-penalty", type=float, default=None, help="-2..2.")
@click.option("--seed", type=int, default=None, help="Seed for reproducible sampling.")
@click.option("--stop", multiple=True, help="Stop before this string (repeatable).")
@click.option("--context", type=int, default=None, help="Context length to allow and plan memory for [default: the model's].")  # fmt: skip
@click.option("--force", is_flag=True, help="Load even if the memory check says it will not fit.")
@friendly_errors
def generate_cmd(
    model: str,
    prompt: str,
    chat: bool,
    system: str | None,
    context: int | None,
    force: bool,
    stop: tuple[str, ...],
    **sampling: Any,
) -> None:
    """Generate a completion of a prompt with MODEL (a store name, a directory or a Hub id)."""
    from mlxrun.errors import InvalidRequestError

    if system is not None and not chat:
        raise InvalidRequestError("--system needs --chat", param="system", hint="Add --chat.")
    if context is not None and context < 1:
        raise InvalidRequestError(f"--context must be >= 1, got {context}", param="context")
    text = read_prompt(prompt)
    params = sampling_params(stop=list(stop), **sampling)

    from mlxrun.generate import generate_stream
    from mlxrun.loader import load

    lm, tokenizer, info = load(model, context=context, force=force)
    if chat:
        note_fallback_template(tokenizer)
    ids = _prompt_ids(tokenizer, text, chat, system)
    if params.max_tokens is None:
        params = params.replace(max_tokens=default_max_tokens(info.context_length - len(ids)))
    if chat and tokenizer.chat_stop_strings:
        params = params.replace(stop=(*params.stop, *tokenizer.chat_stop_strings))
    chunks = generate_stream(lm, tokenizer, ids, params, context_length=info.context_length)
    try:
        last = _stream(chunks)
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): stop quietly, as other Unix tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(0)
    if last is not None:
        click.echo(_stats_line(last), err=True)
