"""A chat conversation whose KV cache lives across turns (no terminal I/O; see mlxrun/cli/chat.py).

    session = ChatSession(model, tokenizer, SamplingParams(temperature=0), system="Be brief.")
    for text in session.send("Hello"):
        print(text, end="")
    session.last_turn.prefilled_tokens   # only the new turn's tokens were computed

Each turn feeds the whole conversation's ids to a PromptCache, which reuses their common prefix.
To keep that prefix long, the conversation's ids are built the way they were fed: the previous
prompt ids, the reply's generated ids, then the template's closing text after the reply (e.g.
`<|im_end|>\\n`), then the new turn's text. Re-encoding the rendered conversation instead would
often split the reply into different tokens than the model generated, and the cache would have
to recompute everything after the first difference.

An interrupted reply (the caller stops iterating, or Ctrl-C lands inside generation) keeps the
text generated so far as the assistant message: it is what the user saw, and the cache holds it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlxrun.errors import ContextLengthExceededError, InvalidRequestError
from mlxrun.generate import PromptCache, check_context, generate_stream
from mlxrun.sampling import SamplingParams

# Settings `/set` may change, by how their value is read.
_FLOAT_FIELDS = frozenset(
    {"temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"}
)
_INT_FIELDS = frozenset({"top_k", "repetition_context_size"})
_OPTIONAL_INT_FIELDS = frozenset({"seed", "max_tokens"})  # "none" unsets them
SETTABLE = tuple(sorted(_FLOAT_FIELDS | _INT_FIELDS | _OPTIONAL_INT_FIELDS | {"stop"}))
_NONE_WORDS = frozenset({"none", "off", "null", ""})

# Stands in for a reply when rendering, to find the text the template writes after one.
_MARKER = "\x00mlxrun-reply\x00"


@dataclass(frozen=True)
class TurnStats:
    """One turn, as measured: prefilled_tokens are the prompt tokens computed (not reused)."""

    prompt_tokens: int
    prefilled_tokens: int
    generation_tokens: int
    ttft_s: float  # from send() to the first generated token
    prompt_tps: float
    generation_tps: float
    peak_memory_gb: float
    finish_reason: str  # "stop", "length" or "interrupted"
    cache_tokens: int  # tokens the cache holds after the turn

    @property
    def reused_tokens(self) -> int:
        return self.prompt_tokens - self.prefilled_tokens


class ChatSession:
    """System prompt, messages, sampling settings and the conversation's PromptCache.

    `send(text)` raises ContextLengthExceededError (changing nothing) when the conversation plus
    the new message and max_tokens would not fit `context_length`; `make_room(text, "drop")` or
    `make_room(text, "clear")` then frees space, and send can be called again.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        params: SamplingParams | None = None,
        *,
        system: str | None = None,
        context_length: int | None = None,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.params = params or SamplingParams()
        self.system = system or None
        self.context_length = context_length
        self._check_max_tokens(self.params)
        self.messages: list[dict[str, str]] = []
        self.turns: list[TurnStats] = []
        self.cache = PromptCache(model)
        # The conversation so far as ids fed/generated, and the rendered text they stand for.
        self._ids: list[int] | None = None
        self._text = ""

    # --- state ----------------------------------------------------------------------------------

    @property
    def last_turn(self) -> TurnStats | None:
        return self.turns[-1] if self.turns else None

    @property
    def cache_tokens(self) -> int:
        return len(self.cache)

    @property
    def cache_bytes(self) -> int:
        """Bytes the KV cache holds (allocated, so a little above the tokens it has)."""
        total = 0
        for c in self.cache.cache:
            try:
                total += int(c.nbytes)
            except (AttributeError, NotImplementedError):
                pass
        return total

    def _full(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + messages

    def _forget_ids(self) -> None:
        self._ids, self._text = None, ""

    def set_system(self, text: str | None) -> None:
        """A new system prompt (None or "" removes it); the history stays."""
        self.system = text or None
        self._forget_ids()

    def clear(self) -> None:
        """Forget the messages (the system prompt and settings stay) and free the cache."""
        self.messages = []
        self._forget_ids()
        self.cache.reset()

    def drop_oldest_turn(self) -> bool:
        """Remove the oldest user message and its reply; False when there is nothing to drop."""
        if not self.messages:
            return False
        del self.messages[:2]
        self._forget_ids()
        return True

    def _check_max_tokens(self, params: SamplingParams) -> None:
        """A reply longer than the context could never be generated: refuse it up front."""
        limit = self.context_length
        if limit is not None and params.max_tokens is not None and params.max_tokens >= limit:
            raise InvalidRequestError(
                f"max_tokens must be below the context length ({limit}), got {params.max_tokens}",
                param="max_tokens",
                hint="Ask for a shorter reply, or raise --context.",
            )

    # --- a turn ---------------------------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _continue(self, text: str) -> list[int]:
        """Ids of text that follows earlier text (no SentencePiece dummy-prefix space)."""
        encode = getattr(self.tokenizer, "_encode_continuation", None)
        return encode(text) if encode is not None else self._encode(text)

    def prompt_ids(self, text: str) -> list[int]:
        """The ids of the conversation plus a user message `text`, ready for the reply."""
        messages = self._full([*self.messages, {"role": "user", "content": text}])
        rendered = self.tokenizer.render_chat(messages, add_generation_prompt=True)
        if self._ids is not None and rendered.startswith(self._text):
            return self._ids + self._continue(rendered[len(self._text) :])
        return self._encode(rendered)

    def check_fits(self, text: str) -> list[int]:
        """The next turn's ids; ContextLengthExceededError when they and max_tokens do not fit."""
        ids = self.prompt_ids(text)
        check_context(len(ids), self.params.max_tokens, self.context_length)
        return ids

    def make_room(self, text: str, how: str) -> int:
        """Free the context for a message `text`: "drop" the oldest turns until it fits, or
        "clear" the conversation. Returns the turns removed. ContextLengthExceededError, with
        nothing removed, when the message would not fit even alone."""
        if how not in ("drop", "clear"):
            raise ValueError(f"how must be 'drop' or 'clear', got {how!r}")
        alone = self._encode(
            self.tokenizer.render_chat(self._full([{"role": "user", "content": text}]))
        )
        check_context(len(alone), self.params.max_tokens, self.context_length)
        before = len(self.messages) // 2
        if how == "clear":
            self.clear()
        while True:
            try:
                self.check_fits(text)
                return before - len(self.messages) // 2
            except ContextLengthExceededError:
                if not self.drop_oldest_turn():
                    raise
                if not self.messages:
                    self.cache.reset()

    def send(self, text: str) -> Iterator[str]:
        """Stream the reply to a user message, as text deltas. The check and the rendering happen
        now (ContextLengthExceededError, InvalidRequestError); the message and the reply join the
        conversation when the iterator ends or is closed early."""
        if not text:
            raise InvalidRequestError("the message is empty", param="messages")
        start = time.perf_counter()
        ids = self.prompt_ids(text)
        check_context(len(ids), self.params.max_tokens, self.context_length)
        return self._reply(text, ids, start)

    def turn_params(self) -> SamplingParams:
        """The settings a turn runs with: plus the stop strings of the fallback chat format."""
        extra = tuple(s for s in self.tokenizer.chat_stop_strings if s not in self.params.stop)
        return self.params.replace(stop=(*self.params.stop, *extra)) if extra else self.params

    def _reply(self, text: str, ids: list[int], start: float) -> Iterator[str]:
        params = self.turn_params()
        stream = generate_stream(
            self.model, self.tokenizer, ids, params, cache=self.cache,
            context_length=self.context_length,
        )  # fmt: skip
        pieces: list[str] = []
        generated: list[int] = []
        last = None
        ttft = None
        finish = "interrupted"
        try:
            for chunk in stream:
                if ttft is None:
                    ttft = time.perf_counter() - start
                last = chunk
                if chunk.token_id is not None:
                    generated.append(chunk.token_id)
                if chunk.finish_reason is not None:
                    finish = chunk.finish_reason
                if chunk.text:
                    pieces.append(chunk.text)
                    yield chunk.text
        except (KeyboardInterrupt, GeneratorExit):
            # Stopped by the user: the turn keeps what was shown so far.
            stream.close()
            self._resync_cache()
            self._commit(text, "".join(pieces), ids, generated, last, ttft, finish)
            raise
        except BaseException:
            stream.close()  # an error leaves the conversation as it was
            self._resync_cache()
            raise
        self._commit(text, "".join(pieces), ids, generated, last, ttft, finish)

    def _resync_cache(self) -> None:
        """After an interruption inside generation the KV may hold tokens its id list lacks (fed
        to some layers, not yet recorded): trim each layer back, or start the cache afresh."""
        n = len(self.cache.token_ids)
        layers = self.cache.cache
        offsets = [getattr(c, "offset", None) for c in layers]
        if all(o == n for o in offsets):
            return
        if all(isinstance(o, int) and o >= n for o in offsets):
            if all(c.is_trimmable() for c in layers):
                for c in layers:
                    c.trim(c.offset - n)
                if all(c.offset == n for c in layers):
                    return
        self.cache.reset()

    def _commit(self, text, reply, ids, generated, last, ttft, finish) -> None:
        self.messages += [
            {"role": "user", "content": text},
            {"role": "assistant", "content": reply},
        ]
        self._remember_ids(reply, ids, generated)
        self.turns.append(
            TurnStats(
                prompt_tokens=len(ids),
                prefilled_tokens=last.prefilled_tokens if last else 0,
                generation_tokens=len(generated),
                ttft_s=ttft or 0.0,
                prompt_tps=last.prompt_tps if last else 0.0,
                generation_tps=last.generation_tps if last else 0.0,
                peak_memory_gb=last.peak_memory_gb if last else 0.0,
                finish_reason=finish,
                cache_tokens=len(self.cache),
            )
        )

    def _remember_ids(self, reply: str, ids: list[int], generated: list[int]) -> None:
        """The conversation's ids as fed: prompt + generated reply + the template's closing text.
        Falls back to encoding the rendered text when the reply's ids do not stand for exactly
        the reply (a stop string cut it) or the template hides where the reply ends."""
        self._text = self.tokenizer.render_chat(
            self._full(self.messages), add_generation_prompt=False
        )
        closing = self._closing()
        shown = self.tokenizer.decode(generated, skip_special_tokens=True)  # as the output stage
        if closing is not None and shown == reply:
            self._ids = ids + generated + self._continue(closing)
        else:
            self._ids = self._encode(self._text)

    def _closing(self) -> str | None:
        """What the template writes after an assistant message's content (None if unclear)."""
        probe = [*self.messages[:-1], {"role": "assistant", "content": _MARKER}]
        try:
            text = self.tokenizer.render_chat(self._full(probe), add_generation_prompt=False)
        except InvalidRequestError:
            return None
        if text.count(_MARKER) != 1:
            return None
        return text.split(_MARKER, 1)[1]

    # --- settings and transcripts ---------------------------------------------------------------

    def set_param(self, name: str, value: str) -> SamplingParams:
        """`/set NAME VALUE`: parse the text and apply it (InvalidRequestError naming the field)."""
        field = name.strip().replace("-", "_")
        if field not in SETTABLE:
            raise InvalidRequestError(
                f"unknown setting {name!r}", param=field,
                hint=f"Settings: {', '.join(SETTABLE)}.",
            )  # fmt: skip
        params = self.params.replace(**{field: _parse_value(field, value)})
        self._check_max_tokens(params)
        self.params = params
        return params

    def settings(self) -> dict[str, Any]:
        """The settable sampling fields, JSON-ready."""
        return _settings_of(self.params)

    def transcript(self) -> dict[str, Any]:
        return {"system": self.system, "messages": list(self.messages), "params": self.settings()}

    def save(self, path: str | Path) -> Path:
        """Write the transcript as JSON (atomically: a temporary sibling, then a rename)."""
        path = Path(path).expanduser()
        data = json.dumps(self.transcript(), indent=2, ensure_ascii=False) + "\n"
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or ".")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as e:
            raise InvalidRequestError(
                f"cannot write {path}: {e.strerror or e}", param="file",
                hint="Pick a path in a directory you can write to.",
            ) from None  # fmt: skip
        return path

    def load(self, path: str | Path, settings: bool = False) -> dict[str, tuple[Any, Any]]:
        """Replace the system prompt and messages with a transcript's (all or nothing). The
        sampling settings stay unless `settings`. Returns the settings the file holds that differ
        from the current ones, as name -> (current, saved): changed when `settings`, else kept."""
        system, messages, params = read_transcript(path, self.params)
        if settings:
            self._check_max_tokens(params)
        differ = _differences(self.settings(), _settings_of(params))
        self.system, self.messages = system, messages
        if settings:
            self.params = params
        self._forget_ids()
        return differ


def _settings_of(params: SamplingParams) -> dict[str, Any]:
    values = {name: getattr(params, name) for name in SETTABLE}
    values["stop"] = list(params.stop)
    return values


def _differences(now: dict[str, Any], saved: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    return {name: (now[name], saved[name]) for name in now if now[name] != saved[name]}


def _parse_value(field: str, value: str) -> Any:
    text = value.strip()
    if field == "stop":
        try:
            return tuple(shlex.split(text)) if text.lower() not in _NONE_WORDS else ()
        except ValueError as e:
            raise InvalidRequestError(f"stop: {e}", param="stop") from None
    if field in _OPTIONAL_INT_FIELDS and text.lower() in _NONE_WORDS:
        return None
    try:
        return int(text) if field in _INT_FIELDS | _OPTIONAL_INT_FIELDS else float(text)
    except ValueError:
        kind = "an integer" if field in _INT_FIELDS | _OPTIONAL_INT_FIELDS else "a number"
        raise InvalidRequestError(f"{field} must be {kind}, got {text!r}", param=field) from None


def _bad_transcript(path: Path, why: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"{path} is not a chat transcript: {why}", param="file",
        hint='A transcript is JSON: {"system": ..., "messages": [...], "params": {...}}.',
    )  # fmt: skip


def read_transcript(
    path: str | Path, base: SamplingParams
) -> tuple[str | None, list[dict[str, str]], SamplingParams]:
    """(system, messages, params) from a /save file; params start from `base`."""
    path = Path(path).expanduser()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise InvalidRequestError(f"cannot read {path}: {e.strerror or e}", param="file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad_transcript(path, f"invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise _bad_transcript(path, "expected a JSON object")
    system = data.get("system")
    if system is not None and not isinstance(system, str):
        raise _bad_transcript(path, '"system" must be a string or null')
    messages = _check_messages(path, data.get("messages", []))
    params = data.get("params") or {}
    if not isinstance(params, dict):
        raise _bad_transcript(path, '"params" must be an object')
    unknown = sorted(set(params) - set(SETTABLE))
    if unknown:
        raise _bad_transcript(path, f"unknown params {', '.join(unknown)}")
    try:
        return system or None, messages, dataclasses.replace(base, **params)
    except InvalidRequestError as e:
        raise _bad_transcript(path, e.message) from None


def _check_messages(path: Path, messages: Any) -> list[dict[str, str]]:
    """User/assistant pairs in turn, each content a string (what send() builds)."""
    if not isinstance(messages, list):
        raise _bad_transcript(path, '"messages" must be a list')
    out = []
    for i, m in enumerate(messages):
        role = "user" if i % 2 == 0 else "assistant"
        if (
            not isinstance(m, dict)
            or m.get("role") != role
            or not isinstance(m.get("content"), str)
        ):
            raise _bad_transcript(
                path, f"message {i} must be {{'role': '{role}', 'content': <string>}}"
            )
        out.append({"role": role, "content": m["content"]})
    if len(out) % 2:
        raise _bad_transcript(path, "the last message must be the assistant's")
    return out
