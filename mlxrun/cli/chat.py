"""`mlxrun chat MODEL`: a terminal chat whose KV cache lives across turns (see mlxrun/chat.py).

Input: one line per message; a line ending in `\\` continues on the next, and a `\"\"\"` line
opens a block that runs to the next `\"\"\"`. Lines starting with `/` are commands (/help lists
them). Arrow keys edit and recall lines (readline; history in $MLXRUN_HOME/chat_history).
Ctrl-C stops a reply and keeps the text shown so far as the assistant's message; at the prompt
it drops the line being typed. Ctrl-D exits.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from typing import Any

import click

from mlxrun.cli.common import friendly_errors, report_error
from mlxrun.cli.generate import DEFAULT_MAX_TOKENS

PROMPT, MORE = ">>> ", "... "
BLOCK = '"""'
HISTORY_LENGTH = 1000
LOAD_SETTINGS = "--settings"  # /load FILE --settings: restore the saved sampling settings too

HELP = f"""\
Commands:
  /help               this text
  /system [TEXT]      show or set the system prompt (the history stays)
  /clear              forget the conversation (system prompt and settings stay)
  /save FILE          write the conversation as JSON ({{"system", "messages", "params"}})
  /load FILE [--settings]
                      replace the conversation (and system prompt) with a saved one; the
                      settings stay unless --settings, which restores the saved ones too
  /stats              the last turn's tokens, TTFT, speeds and peak memory; the cache size
  /set [NAME VALUE]   show settings, or change one, e.g. /set temperature 0.2 (none unsets
                      seed and max_tokens; /set stop "###" "END" sets stop strings)
  /exit               quit (as does Ctrl-D)
Input: end a line with \\ to continue it; {BLOCK} on its own line opens and closes a block;
start a message with // to send it with a leading /.
Ctrl-C stops a reply (its text so far stays in the conversation)."""


def read_message(read_line: Callable[[str], str]) -> str:
    """One message from `read_line(prompt)` calls: a line, `\\`-continued lines, or a block."""
    line = read_line(PROMPT)
    if line.lstrip().startswith(BLOCK):
        return _read_block(line.lstrip()[len(BLOCK) :], read_line)
    parts = []
    while line.endswith("\\"):
        parts.append(line[:-1])
        line = read_line(MORE)
    parts.append(line)
    return "\n".join(parts)


def _read_block(first: str, read_line: Callable[[str], str]) -> str:
    lines, line = [], first
    while not line.rstrip().endswith(BLOCK):
        lines.append(line)
        line = read_line(MORE)
    lines.append(line.rstrip()[: -len(BLOCK)])
    if lines and not lines[0].strip():
        lines.pop(0)  # the opening line held only the quotes
    if lines and not lines[-1].strip():
        lines.pop()  # as did the closing one
    return "\n".join(lines)


class _ReplyInterrupt:
    """Ctrl-C during a reply: once tokens flow it asks the stream to stop at the next token (a
    clean point); before that (prefill) or when pressed twice it raises KeyboardInterrupt."""

    def __init__(self) -> None:
        self.requested = False
        self.streaming = False

    def __enter__(self) -> _ReplyInterrupt:
        self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self._old)

    def _handle(self, signum: int, frame: Any) -> None:
        if not self.streaming or self.requested:
            raise KeyboardInterrupt
        self.requested = True


def _shown(value: Any) -> str:
    return "none" if value is None else str(value)


def _fmt_bytes(n: int) -> str:
    from mlxrun.errors import format_size

    return format_size(n)


class ChatRepl:
    """The terminal loop around a ChatSession. All output goes through click.echo."""

    def __init__(self, session: Any, name: str, read_line: Callable[[str], str] = input):
        self.session, self.name, self.read_line = session, name, read_line
        self.commands: dict[str, Callable[[str], bool | None]] = {
            "help": self._help, "?": self._help, "system": self._system, "clear": self._clear,
            "save": self._save, "load": self._load, "stats": self._stats, "set": self._set,
            "exit": self._exit, "quit": self._exit,
        }  # fmt: skip

    def run(self) -> None:
        click.echo(
            f"Chatting with {self.name} (context {self.session.context_length} tokens). "
            "Type /help for commands, Ctrl-D to quit."
        )
        while True:
            try:
                text = read_message(self.read_line)
            except KeyboardInterrupt:
                click.echo()  # drop the line being typed, as shells do
                continue
            except EOFError:
                click.echo()
                return
            if text.startswith("//"):
                self._turn(text[1:])  # the escape for a message that starts with "/"
            elif text.startswith("/") and "\n" not in text:
                if self._command(text[1:]):
                    return
            elif text.strip():
                self._turn(text)

    # --- a turn ---------------------------------------------------------------------------------

    def _turn(self, text: str) -> None:
        from mlxrun.errors import ContextLengthExceededError, MlxrunError

        try:
            try:
                reply = self.session.send(text)
            except ContextLengthExceededError as e:
                reply = self._overflow(text, e)
            if reply is not None:
                self._stream(reply)
        except MlxrunError as e:
            report_error(e)
        except KeyboardInterrupt:  # before the reply began (rendering, making room)
            click.echo("\n[stopped]")

    def _stream(self, reply: Any) -> None:
        out = sys.stdout
        wrote = ""
        stop = _ReplyInterrupt()
        try:
            with stop:
                for text in reply:
                    stop.streaming = True
                    out.write(text)
                    out.flush()
                    wrote = text or wrote
                    if stop.requested:
                        break
        except KeyboardInterrupt:
            stop.requested = True  # the session kept the partial reply
        finally:
            reply.close()
        if wrote and not wrote.endswith("\n"):
            out.write("\n")
        out.flush()
        if stop.requested:
            click.echo("[stopped]")

    def _overflow(self, text: str, error: Any) -> Any:
        """Ask how to make room; returns the reply stream, or None when the user gives up."""
        from mlxrun.errors import ContextLengthExceededError

        s = self.session
        reply = f" plus a reply of up to {s.params.max_tokens}" if s.params.max_tokens else ""
        click.echo(
            f"The conversation with this message ({error.prompt_tokens} tokens){reply} "
            f"would not fit the {s.context_length}-token context."
        )
        while True:
            try:
                answer = self.read_line("[d]rop oldest turns / [c]lear / [a]bort? ").strip()
            except (EOFError, KeyboardInterrupt):
                click.echo()
                answer = "a"
            choice = answer[:1].lower()
            if choice == "a":
                click.echo("Not sent.")
                return None
            if choice in ("d", "c"):
                break
        try:
            dropped = self.session.make_room(text, "drop" if choice == "d" else "clear")
        except ContextLengthExceededError as e:
            click.echo(
                f"Error: the message alone does not fit ({e.prompt_tokens} tokens with the "
                "system prompt); shorten it, lower max_tokens or raise --context",
                err=True,
            )
            return None
        click.echo("Cleared the conversation." if choice == "c" else f"Dropped {dropped} turn(s).")
        return self.session.send(text)

    # --- commands -------------------------------------------------------------------------------

    def _command(self, line: str) -> bool:
        """Run a /command; True means exit."""
        from mlxrun.errors import MlxrunError

        name, _, arg = line.strip().partition(" ")
        handler = self.commands.get(name.lower())
        if handler is None:
            click.echo(f"Error: unknown command /{name} (/help lists them)", err=True)
            return False
        try:
            return bool(handler(arg.strip()))
        except MlxrunError as e:
            report_error(e)
            return False

    def _help(self, arg: str) -> None:
        click.echo(HELP)

    def _exit(self, arg: str) -> bool:
        return True

    def _system(self, arg: str) -> None:
        if not arg:
            click.echo(f"System prompt: {self.session.system!r}")
            return
        self.session.set_system(arg)
        click.echo("System prompt set.")

    def _clear(self, arg: str) -> None:
        self.session.clear()
        click.echo("Conversation cleared.")

    def _save(self, arg: str) -> None:
        if not arg:
            click.echo("Usage: /save FILE", err=True)
            return
        path = self.session.save(arg)
        click.echo(f"Saved {len(self.session.messages)} messages to {path}.")

    def _load(self, arg: str) -> None:
        words, path, settings = arg.split(), arg, True
        if words[:1] == [LOAD_SETTINGS]:
            path = arg[len(LOAD_SETTINGS) :].strip()
        elif words[-1:] == [LOAD_SETTINGS]:
            path = arg[: -len(LOAD_SETTINGS)].strip()
        else:
            settings = False
        if not path:
            click.echo(f"Usage: /load FILE [{LOAD_SETTINGS}]", err=True)
            return
        differ = self.session.load(path, settings=settings)
        n = len(self.session.messages)
        changes = ", ".join(f"{k} {_shown(a)} -> {_shown(b)}" for k, (a, b) in differ.items())
        if settings:
            click.echo(f"Loaded {n} messages and the settings from {path}"
                       + (f": {changes}." if changes else " (the same as before)."))  # fmt: skip
        elif differ:
            saved = ", ".join(f"{k} {_shown(b)}" for k, (_, b) in differ.items())
            click.echo(f"Loaded {n} messages from {path}; kept the current settings (the file has "
                       f"{saved}: /load {path} {LOAD_SETTINGS} restores them).")  # fmt: skip
        else:
            click.echo(f"Loaded {n} messages from {path}.")

    def _set(self, arg: str) -> None:
        if not arg:
            for name, value in self.session.settings().items():
                click.echo(f"  {name} = {value}")
            return
        name, _, value = arg.partition(" ")
        if not value.strip():
            click.echo("Usage: /set NAME VALUE (/set alone lists the settings)", err=True)
            return
        params = self.session.set_param(name, value)
        field = name.replace("-", "_")
        click.echo(f"{field} = {getattr(params, field)}")

    def _stats(self, arg: str) -> None:
        s = self.session
        t = s.last_turn
        if t is None:
            click.echo("No turns yet.")
        else:
            click.echo(
                f"Last turn: prompt {t.prompt_tokens} tokens ({t.prefilled_tokens} prefilled, "
                f"{t.reused_tokens} from the cache) | TTFT {t.ttft_s * 1000:.0f} ms | "
                f"prefill {t.prompt_tps:.1f} tok/s | generation {t.generation_tokens} tokens, "
                f"{t.generation_tps:.1f} tok/s | peak memory {t.peak_memory_gb:.3f} GB | "
                f"finish: {t.finish_reason}"
            )
        click.echo(
            f"Cache: {s.cache_tokens} tokens ({_fmt_bytes(s.cache_bytes)}) of a "
            f"{s.context_length}-token context | turns: {len(s.messages) // 2}"
        )


def _setup_readline() -> Callable[[], None]:
    """Line editing and history when stdin is a terminal; returns the function that saves it."""
    if not sys.stdin.isatty():
        return lambda: None
    try:
        import readline
    except ImportError:  # pragma: no cover - Python built without readline
        return lambda: None
    from mlxrun.store import mlxrun_home

    path = mlxrun_home() / "chat_history"
    try:
        readline.read_history_file(path)
    except OSError:
        pass  # first run, or an unreadable file: start with no history
    readline.set_history_length(HISTORY_LENGTH)

    def save() -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)
        except OSError:
            pass  # history is a convenience; never fail the exit over it

    return save


@click.command("chat")
@click.argument("model")
@click.option("--system", default=None, help="System prompt.")
@click.option("--max-tokens", type=int, default=None, help=f"Longest reply; /set max_tokens changes it [default: {DEFAULT_MAX_TOKENS}, at most half the context].")  # fmt: skip
@click.option("--temperature", type=float, default=None, help="0 is greedy [default: 0.7].")
@click.option("--top-p", type=float, default=None, help="Nucleus sampling mass in (0, 1].")
@click.option("--top-k", type=int, default=None, help="Keep the k most likely tokens (0: off).")
@click.option("--min-p", type=float, default=None, help="Drop tokens below min-p x the top one.")
@click.option("--seed", type=int, default=None, help="Seed for reproducible sampling.")
@click.option("--context", type=int, default=None, help="Context length to allow and plan memory for [default: the model's].")  # fmt: skip
@click.option("--force", is_flag=True, help="Load even if the memory check says it will not fit.")
@friendly_errors
def chat_cmd(
    model: str, system: str | None, context: int | None, force: bool, **sampling: Any
) -> None:
    """Chat with MODEL (a store name, a directory or a Hub id) in the terminal."""
    from mlxrun.cli.generate import (
        DEFAULT_TEMPERATURE,
        default_max_tokens,
        note_fallback_template,
        sampling_params,
    )
    from mlxrun.errors import InvalidRequestError

    if context is not None and context < 1:
        raise InvalidRequestError(f"--context must be >= 1, got {context}", param="context")
    if sampling["temperature"] is None:
        sampling["temperature"] = DEFAULT_TEMPERATURE
    params = sampling_params(**sampling)

    from mlxrun.chat import ChatSession
    from mlxrun.loader import load

    click.echo(f"Loading {model}…", err=True)
    lm, tokenizer, info = load(model, context=context, force=force)
    note_fallback_template(tokenizer)
    if params.max_tokens is None:  # leave half the context to the conversation
        params = params.replace(max_tokens=default_max_tokens(info.context_length // 2))
    session = ChatSession(lm, tokenizer, params, system=system, context_length=info.context_length)
    save_history = _setup_readline()
    try:
        ChatRepl(session, info.name).run()
    finally:
        save_history()


if __name__ == "__main__":
    chat_cmd()
