"""`mlxrun generate MODEL -p TEXT`: one completion streamed to stdout, statistics to stderr."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

import click

from mlxrun.budget import TERMINAL_MAX_TOKENS as DEFAULT_MAX_TOKENS
from mlxrun.cli.common import friendly_errors
from mlxrun.cli.engine_options import cache_options, grammar_options
from mlxrun.cli.speculation import pop_speculation, speculation_for, speculation_options

if TYPE_CHECKING:
    from mlxrun.generate import GenerationChunk
    from mlxrun.sampling import SamplingParams
    from mlxrun.tokenizer import Tokenizer

DEFAULT_TEMPERATURE = 0.7

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


def sampling_params(**values: Any) -> SamplingParams:
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


def note_fallback_template(tokenizer: Tokenizer) -> None:
    """One line on stderr when the model has no chat template and the plain fallback stands in."""
    from mlxrun.tokenizer import FALLBACK_NOTICE

    if not tokenizer.has_chat_template:
        click.echo(FALLBACK_NOTICE, err=True)


def _prompt_ids(tokenizer: Tokenizer, text: str, chat: bool, system: str | None) -> list[int]:
    if not chat:
        return tokenizer.encode(text)
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": text})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def _stats_line(chunk: GenerationChunk) -> str:
    return (
        f"prompt: {chunk.prompt_tokens} tokens ({chunk.cached_tokens} cached), "
        f"{chunk.prompt_tps:.1f} tok/s | "
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
@click.option("--parallel", type=click.Choice(["tensor", "pipeline"]), default=None, help="Under mlx.launch: split the model by tensor or pipeline [default: tensor if the architecture can].")  # fmt: skip
@cache_options
@grammar_options
@speculation_options
@friendly_errors
def generate_cmd(
    model: str,
    prompt: str,
    chat: bool,
    system: str | None,
    context: int | None,
    force: bool,
    stop: tuple[str, ...],
    parallel: str | None,
    cache_dir: str | None,
    cache_disk_size: str | None,
    json_schema: str | None,
    grammar: str | None,
    **sampling: Any,
) -> None:
    """Generate a completion of a prompt with MODEL (a store name, a directory or a Hub id)."""
    from mlxrun.cli.engine_options import cache_overrides, read_constraint
    from mlxrun.errors import InvalidRequestError

    if system is not None and not chat:
        raise InvalidRequestError("--system needs --chat", param="system", hint="Add --chat.")
    if context is not None and context < 1:
        raise InvalidRequestError(f"--context must be >= 1, got {context}", param="context")
    spec_flags = pop_speculation(sampling)
    text = read_prompt(prompt)
    params = sampling_params(stop=list(stop), **sampling)

    caches = cache_overrides(None, cache_dir, cache_disk_size)

    from mlxrun import distributed
    from mlxrun.engine_mirror import MirroredEngine, run_follower
    from mlxrun.generate import local_engine, stream_request
    from mlxrun.loader import load

    world = distributed.init_world(parallel)
    distributed.quiet_followers(world)
    lm, tokenizer, info = load(model, context=context, force=force, world=world)
    distributed.announce(distributed.current())
    if chat:
        note_fallback_template(tokenizer)
    constraint = read_constraint(tokenizer, json_schema, grammar)
    ids = _prompt_ids(tokenizer, text, chat, system)
    if chat and tokenizer.chat_stop_strings:
        params = params.replace(stop=(*params.stop, *tokenizer.chat_stop_strings))
    if caches["cache_dir"] is None:
        caches["cache_memory_bytes"] = 0  # one request: a prefix cache only feeds the disk tier
    caches.update(speculation_for(tokenizer, spec_flags, context))
    with local_engine(
        lm, tokenizer, info.context_length, namespace=info.name,
        max_running=1, default_max_tokens=DEFAULT_MAX_TOKENS, **caches,
    ) as engine:  # fmt: skip
        if world is not None and not world.leader:
            assert isinstance(engine, MirroredEngine)  # make_engine mirrors under mlx.launch
            run_follower(engine)  # mirror rank 0's engine until it stops
            return
        chunks = stream_request(engine, tokenizer, ids, params, constraint=constraint)
        try:
            last = _stream(chunks)
        except BrokenPipeError:
            # The reader went away (e.g. `| head`): stop quietly, as other Unix tools do.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            sys.exit(0)
    if last is not None and (world is None or world.leader):
        click.echo(_stats_line(last), err=True)
