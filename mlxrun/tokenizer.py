"""Tokenizer layer: chat templates, FIM tokens and a streaming detokenizer.

`load_tokenizer(path)` wraps a transformers tokenizer. Chat templates are rendered by transformers
itself (same Jinja sandbox, globals and filters), so prompts match what the model was trained on.
Decoding never applies `clean_up_tokenization_spaces`: that rewrites " ." as "." and corrupts code;
generated text is exactly the tokens' text.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from .errors import CorruptCheckpointError, InvalidRequestError, NotAModelError

# Used when a checkpoint ships no chat template (base models). Plain role-prefixed turns:
#   System: …\n\nUser: …\n\nAssistant: …\n\nAssistant:
# with the BOS token first when the tokenizer normally adds one. Generation should stop at the
# next turn, hence FALLBACK_STOP_STRINGS.
FALLBACK_CHAT_TEMPLATE = """\
{%- if mlxrun_add_bos and bos_token is defined and bos_token %}{{- bos_token }}{%- endif %}
{%- if tools %}
{{- 'Tools:\\n' }}
{%- for tool in tools %}{{- (tool | tojson) + '\\n' }}{%- endfor %}
{{- '\\n' }}
{%- endif %}
{%- for message in messages %}
{{- (message.role | capitalize) + ': ' }}
{%- if message.content is string %}{{- message.content }}
{%- elif message.content is iterable %}
{%- for part in message.content %}{%- if part.text is defined %}{{- part.text }}{%- endif %}{%- endfor %}
{%- endif %}
{%- if message.tool_calls is defined %}{{- (message.tool_calls | tojson) }}{%- endif %}
{{- '\\n\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- 'Assistant:' }}{%- endif %}
"""
FALLBACK_STOP_STRINGS: tuple[str, ...] = ("\n\nUser:",)
# What `chat` and `generate --chat` print (once, on stderr) when the fallback stands in.
FALLBACK_NOTICE = (
    "Note: this model has no chat template (a base model?); using a plain 'User: / Assistant:' "
    "format, which it may not follow."
)

# End-of-turn tokens: models emit them to finish an assistant turn, while their tokenizer's eos is
# often the end-of-document token. Counted as eos when the vocab has them and the template uses them.
END_OF_TURN_TOKENS: tuple[str, ...] = (
    "<|im_end|>",  # ChatML (Qwen, many fine-tunes)
    "<|eot_id|>",  # Llama 3
    "<|eom_id|>",  # Llama 3.1 tool calls
    "<end_of_turn>",  # Gemma
    "<|end|>",  # Phi-3
    "<|END_OF_TURN_TOKEN|>",  # Command-R
)

_REPLACEMENT = "\ufffd"  # what an incomplete UTF-8 sequence decodes to


@dataclass(frozen=True)
class FimTokens:
    """Fill-in-the-middle control tokens found in the vocab (strings and ids)."""

    style: str  # "qwen" (also CodeGemma), "starcoder" (1 and 2), "codellama", "deepseek"
    prefix: str
    prefix_id: int
    suffix: str
    suffix_id: int
    middle: str
    middle_id: int
    eot: str | None = None
    eot_id: int | None = None
    pad: str | None = None
    pad_id: int | None = None
    repo_name: str | None = None
    repo_name_id: int | None = None
    file_sep: str | None = None
    file_sep_id: int | None = None


# Per style, each role's spellings in preference order.
_FIM_STYLES: dict[str, dict[str, tuple[str, ...]]] = {
    "qwen": dict(
        prefix=("<|fim_prefix|>",), suffix=("<|fim_suffix|>",), middle=("<|fim_middle|>",),
        pad=("<|fim_pad|>",), repo_name=("<|repo_name|>",),
        file_sep=("<|file_sep|>", "<|file_separator|>"),
    ),
    "starcoder": dict(
        prefix=("<fim_prefix>",), suffix=("<fim_suffix>",), middle=("<fim_middle>",),
        pad=("<fim_pad>",), repo_name=("<repo_name>", "<reponame>"), file_sep=("<file_sep>",),
    ),
    "codellama": dict(
        prefix=("▁<PRE>", "<PRE>"), suffix=("▁<SUF>", "<SUF>"), middle=("▁<MID>", "<MID>"),
        eot=("▁<EOT>", "<EOT>"),
    ),
    # DeepSeek-Coder: begin, hole, end = prefix, suffix, middle. The real tokens use fullwidth bars.
    "deepseek": dict(
        prefix=("<｜fim▁begin｜>", "<|fim▁begin|>"), suffix=("<｜fim▁hole｜>", "<|fim▁hole|>"),
        middle=("<｜fim▁end｜>", "<|fim▁end|>"),
    ),
}  # fmt: skip
# CodeLlama's "▁<PRE>" carries the space before it, and its format puts one after it too.
_SPACE_AFTER_PREFIX = frozenset({"codellama"})


def _find(
    vocab: Mapping[str, int], spellings: Sequence[str]
) -> tuple[str, int] | tuple[None, None]:
    for s in spellings:
        if s in vocab:
            return s, vocab[s]
    return None, None


def detect_fim_tokens(vocab: Mapping[str, int]) -> FimTokens | None:
    """The first FIM style whose prefix, suffix and middle tokens are all in `vocab`."""
    for style, roles in _FIM_STYLES.items():
        found = {role: _find(vocab, roles.get(role, ())) for role in _FIM_ROLES}
        if all(found[role][0] is not None for role in ("prefix", "suffix", "middle")):
            fields: dict[str, Any] = {}
            for role, (text, token_id) in found.items():
                fields[role], fields[f"{role}_id"] = text, token_id
            return FimTokens(style=style, **fields)
    return None


_FIM_ROLES = ("prefix", "suffix", "middle", "eot", "pad", "repo_name", "file_sep")


class StreamingDetokenizer:
    """Token ids in, text out, exactly: "".join(add_token(i) for i in ids) + finalize() == decode(ids).

    It decodes a short window: the last emitted chunk (context) plus the ids not yet emitted, and
    emits what the window adds beyond the context's own text. The context makes position-dependent
    decoder rules (SentencePiece strips the first token's leading space) act on text already
    emitted. Text is held back while it ends in U+FFFD (a UTF-8 sequence split across tokens) and
    while the last token is a byte-fallback piece: such a run decodes as a whole (an invalid run
    turns every byte into U+FFFD), so its text is fixed only when a non-byte token follows. Ids
    the decoder drops (`dropped(id)`: unknown ids, special ones when skipping them) do not end a run.
    """

    def __init__(
        self,
        decode: Callable[[list[int]], str],
        byte_token_ids: frozenset[int],
        dropped: Callable[[int], bool],
    ):
        self._decode = decode
        self._byte_ids = byte_token_ids
        self._dropped = dropped
        self._in_byte_run = False
        self._window: list[int] = []
        self._context_len = 0  # the window's first ids are the last emitted chunk
        self._context_text = ""  # decode() of that chunk on its own

    def add_token(self, token_id: int) -> str:
        """The text that token_id completes ("" while it is still undetermined)."""
        self._window.append(token_id)
        if token_id in self._byte_ids:
            self._in_byte_run = True
        elif not self._dropped(token_id):
            self._in_byte_run = False
        if self._in_byte_run:
            return ""
        text = self._decode(self._window)
        if text.endswith(_REPLACEMENT):
            return ""
        new = text[len(self._context_text) :]
        if not new:
            return ""
        chunk = self._window[self._context_len :]
        self._context_text = text if self._context_len == 0 else self._decode(chunk)
        self._window = chunk
        self._context_len = len(chunk)
        return new

    def finalize(self) -> str:
        """Whatever is still held back; the detokenizer starts afresh afterwards."""
        out = ""
        if len(self._window) > self._context_len:
            out = self._decode(self._window)[len(self._context_text) :]
        self._window, self._context_len, self._context_text = [], 0, ""
        self._in_byte_run = False
        return out


class Tokenizer:
    """A checkpoint's tokenizer: encode/decode, chat template, eos ids, FIM tokens, detokenizers."""

    def __init__(self, backend: Any, path: Path, extra_eos_ids: Iterable[int] = ()):
        self.backend = backend  # the transformers tokenizer
        self.path = Path(path)
        self._named_templates = _named_templates(backend.chat_template, self.path)
        self._extra_eos = frozenset(int(i) for i in extra_eos_ids)
        first = backend.encode("a", add_special_tokens=True)
        self._adds_bos = self.bos_token_id is not None and first[:1] == [self.bos_token_id]
        self._decode_fn = _fast_decode(backend)

    # --- vocabulary ---------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (the model's embedding may be larger)."""
        return len(self.backend)

    @property
    def bos_token_id(self) -> int | None:
        return self.backend.bos_token_id

    @cached_property
    def eos_token_ids(self) -> frozenset[int]:
        """Ids that end generation: the tokenizer's eos, generation_config.json's and config.json's
        eos_token_id (int or list), ids passed to load_tokenizer, the end-of-turn tokens of
        END_OF_TURN_TOKENS that the chat template uses, and CodeLlama's FIM <EOT>."""
        ids = set(self._extra_eos)
        if self.backend.eos_token_id is not None:
            ids.add(self.backend.eos_token_id)
        for name in ("generation_config.json", "config.json"):
            ids.update(_config_eos_ids(self.path / name))
        templates = "".join(self._named_templates.values())
        vocab = self._vocab
        # gpt-oss (harmony) ends every message with <|end|>, its turn only with <|return|>/<|call|>.
        harmony = "<|channel|>" in templates
        ids.update(
            vocab[t]
            for t in END_OF_TURN_TOKENS
            if t in vocab and t in templates and not (harmony and t == "<|end|>")
        )
        if self.fim_tokens is not None and self.fim_tokens.eot_id is not None:
            ids.add(self.fim_tokens.eot_id)
        return frozenset(ids)

    @cached_property
    def _vocab(self) -> dict[str, int]:
        return self.backend.get_vocab()

    @cached_property
    def _special_ids(self) -> frozenset[int]:
        added = self.backend.added_tokens_decoder
        return frozenset(self.backend.all_special_ids) | {i for i, t in added.items() if t.special}

    @cached_property
    def _byte_token_ids(self) -> frozenset[int]:
        """SentencePiece byte-fallback pieces, "<0x00>".."<0xFF>"."""
        return frozenset(
            i
            for t, i in self._vocab.items()
            if len(t) == 6 and t.startswith("<0x") and t.endswith(">") and _is_hex(t[3:5])
        )

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.convert_ids_to_tokens(int(token_id))

    def is_special(self, token_id: int) -> bool:
        return int(token_id) in self._special_ids

    # --- encode / decode ------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """The text of `ids`; unknown ids decode to nothing (as transformers does)."""
        return self._decode_fn([int(i) for i in ids], skip_special_tokens)

    def detokenizer(self, skip_special_tokens: bool = False) -> StreamingDetokenizer:
        """A fresh streaming detokenizer (one per request), exact against decode()."""

        size, special = self.vocab_size, self._special_ids

        def decode(ids: list[int]) -> str:
            return self._decode_fn(ids, skip_special_tokens)

        def dropped(token_id: int) -> bool:
            return not 0 <= token_id < size or (skip_special_tokens and token_id in special)

        return StreamingDetokenizer(decode, self._byte_token_ids, dropped)

    def _encode_continuation(self, text: str) -> list[int]:
        """Encode text as it reads mid-sequence, without SentencePiece's dummy-prefix space."""
        if not text:
            return []
        plain = self.encode(text, add_special_tokens=False)
        if not self._dummy_prefix:
            return plain
        # A newline guard takes the dummy space and does not merge with what follows it.
        guard = self.encode("\n", add_special_tokens=False)
        guarded = self.encode("\n" + text, add_special_tokens=False)
        return guarded[len(guard) :] if guarded[: len(guard)] == guard else plain

    @cached_property
    def _dummy_prefix(self) -> bool:
        ids = self.encode("a", add_special_tokens=False)
        token = self.id_to_token(ids[0]) if ids else None
        return token is not None and token.startswith("▁")

    # --- chat templates -------------------------------------------------------------------------

    @property
    def has_chat_template(self) -> bool:
        return bool(self._named_templates)

    @property
    def chat_template(self) -> str | None:
        """The checkpoint's default template (None: the plain fallback is used)."""
        return self._pick_template(None) if self._named_templates else None

    @property
    def chat_stop_strings(self) -> tuple[str, ...]:
        """Stop strings a chat request needs on top of eos: those of the fallback format."""
        return () if self.has_chat_template else FALLBACK_STOP_STRINGS

    def _pick_template(self, tools: Any) -> str:
        named = self._named_templates
        if not named:
            return FALLBACK_CHAT_TEMPLATE
        if tools is not None and "tool_use" in named:
            return named["tool_use"]
        # transformers refuses a set of named templates without "default"; the first one is used.
        return named.get("default") or next(iter(named.values()))

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        **template_kwargs: Any,
    ) -> str:
        """The prompt text, exactly as transformers' apply_chat_template(tokenize=False) renders it.

        continue_final_message leaves the last (assistant) message open for the model to continue
        and turns add_generation_prompt off. Raises InvalidRequestError(param="messages").
        """
        return self._apply(
            messages, tools, add_generation_prompt, continue_final_message, False, template_kwargs
        )

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        **template_kwargs: Any,
    ) -> list[int]:
        """The prompt ids. The template writes any BOS itself, so no special tokens are added."""
        return self._apply(
            messages, tools, add_generation_prompt, continue_final_message, True, template_kwargs
        )

    def _apply(self, messages, tools, add_generation_prompt, continue_final, tokenize, kwargs):
        from mlxrun.chat_turns import fold_system, late_system, renders_late_system

        if late_system(messages):  # a system message mid-conversation: render it if we can

            def render(msgs):
                return self._render(
                    msgs, tools, add_generation_prompt, continue_final, False, kwargs
                )

            if not renders_late_system(render, messages):
                messages = fold_system(messages)
        return self._render(
            messages, tools, add_generation_prompt, continue_final, tokenize, kwargs
        )

    def _render(self, messages, tools, add_generation_prompt, continue_final, tokenize, kwargs):
        from jinja2.exceptions import TemplateError

        template = self._pick_template(tools)
        if not self._named_templates:
            kwargs = {"mlxrun_add_bos": self._adds_bos, **kwargs}
        try:
            out = self.backend.apply_chat_template(
                list(messages),
                tools=None if tools is None else list(tools),
                chat_template=template,
                add_generation_prompt=add_generation_prompt and not continue_final,
                continue_final_message=continue_final,
                tokenize=tokenize,
                return_dict=False,
                **kwargs,
            )
        except TemplateError as e:
            raise InvalidRequestError(
                f"the chat template rejected the messages: {e.message or e}",
                param="messages",
                hint="Check the order of roles and the message fields this model accepts.",
            ) from None
        except (TypeError, ValueError) as e:  # e.g. an empty list, content of the wrong type
            as_text = _text_arguments(messages)
            if as_text is not None:  # DeepSeek's templates concatenate arguments as JSON text
                return self._apply(
                    as_text, tools, add_generation_prompt, continue_final, tokenize, kwargs
                )
            raise InvalidRequestError(
                f"cannot render the messages: {e}", param="messages"
            ) from None
        return list(out) if tokenize else out

    # --- fill in the middle ---------------------------------------------------------------------

    @cached_property
    def fim_tokens(self) -> FimTokens | None:
        return detect_fim_tokens(self._vocab)

    def build_fim_prompt(self, prefix: str, suffix: str) -> list[int]:
        """A fill-in-the-middle prompt in PSM order: [BOS] PRE prefix SUF suffix MID.

        BOS comes first when the tokenizer adds one to plain text (CodeLlama, DeepSeek). CodeLlama
        reads "<PRE> {prefix} <SUF>{suffix} <MID>": its tokens carry the space before them, and
        the prefix gets one space after <PRE>. Raises InvalidRequestError without FIM tokens.
        """
        fim = self.fim_tokens
        if fim is None:
            raise InvalidRequestError(
                "this model has no fill-in-the-middle tokens",
                param="suffix",
                hint="Use a code model trained for FIM (Qwen2.5-Coder, StarCoder2, CodeLlama…).",
            )
        bos = self.bos_token_id
        ids = [bos] if self._adds_bos and bos is not None else []  # _adds_bos implies a bos
        ids.append(fim.prefix_id)
        space = " " if fim.style in _SPACE_AFTER_PREFIX else ""
        ids += self._encode_continuation(space + prefix)
        ids.append(fim.suffix_id)
        ids += self._encode_continuation(suffix)
        ids.append(fim.middle_id)
        return ids


def _is_hex(s: str) -> bool:
    return all(c in "0123456789abcdefABCDEF" for c in s)


def _fast_decode(backend: Any) -> Callable[[list[int], bool], str]:
    """transformers' decode without cleanup; straight to the Rust tokenizer when that is all it does."""
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # pragma: no cover - older transformers
        TokenizersBackend = None  # type: ignore[misc,assignment]  # noqa: N806
    if TokenizersBackend is not None and type(backend)._decode is TokenizersBackend._decode:
        rust = backend.backend_tokenizer
        return lambda ids, skip: rust.decode(ids, skip_special_tokens=skip)
    return lambda ids, skip: backend.decode(
        ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False
    )


def _named_templates(template: Any, path: Path) -> dict[str, str]:
    """Templates by name, as transformers loaded them (chat_template.jinja and
    additional_chat_templates/ before tokenizer_config.json), else a chat_template.json."""
    if isinstance(template, str):
        return {"default": template}
    if isinstance(template, Mapping):
        return {str(k): v for k, v in template.items() if isinstance(v, str)}
    if isinstance(template, list):  # the tokenizer_config.json form, if not converted already
        return {t["name"]: t["template"] for t in template if isinstance(t, Mapping)}
    legacy = _read_json(path / "chat_template.json")
    found = legacy.get("chat_template") if isinstance(legacy, Mapping) else None
    return _named_templates(found, path) if found is not None else {}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _config_eos_ids(path: Path) -> set[int]:
    data = _read_json(path)
    if not isinstance(data, Mapping):
        return set()
    found: set[int] = set()
    for section in (data, data.get("text_config")):
        value = section.get("eos_token_id") if isinstance(section, Mapping) else None
        values = value if isinstance(value, list) else [value]
        found.update(int(v) for v in values if isinstance(v, int) and not isinstance(v, bool))
    return found


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def load_tokenizer(path: Path, eos_token_ids: Iterable[int] | None = None) -> Tokenizer:
    """The tokenizer of the checkpoint directory `path`; `eos_token_ids` adds stop ids (e.g. from
    the model config). Raises NotAModelError without tokenizer files, CorruptCheckpointError when
    transformers cannot load them."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir() or not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise NotAModelError(
            f"no tokenizer in {path}",
            hint="The directory needs tokenizer.json or tokenizer.model (with tokenizer_config.json).",
        )
    try:
        # Never run code shipped with a model (auto_map): a checkpoint is untrusted input.
        backend = AutoTokenizer.from_pretrained(
            str(path), local_files_only=True, trust_remote_code=False
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpointError(f"cannot load the tokenizer in {path}: {e}") from e
    return Tokenizer(backend, path, eos_token_ids or ())


def _text_arguments(messages: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]] | None:
    """`messages` with tool-call arguments given as JSON text instead of objects; None when no
    call has object arguments."""
    out, changed = [], False
    for message in messages:
        calls = message.get("tool_calls") if isinstance(message, Mapping) else None
        if not isinstance(calls, list):
            out.append(message)
            continue
        new_calls = []
        for call in calls:
            fn = call.get("function") if isinstance(call, Mapping) else None
            if isinstance(fn, Mapping) and isinstance(fn.get("arguments"), Mapping):
                text = json.dumps(fn["arguments"], ensure_ascii=False)
                call, changed = {**call, "function": {**fn, "arguments": text}}, True
            new_calls.append(call)
        out.append({**message, "tool_calls": new_calls})
    return out if changed else None
