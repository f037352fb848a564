"""Which syntax a checkpoint writes tool calls in: the one registry of formats, detection from the
chat template (else the vocabulary), and lookup by name (`mlxrun serve --tool-parser NAME`).

Formats (what the model writes):
  hermes       <tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>   (Qwen 2.5/3, Hermes)
  qwen3_coder  <tool_call>\\n<function=f>\\n<parameter=k>\\nvalue\\n</parameter>\\n</function>\\n</tool_call>
               (Qwen3-Coder, Qwen3.5): string values raw, others as JSON
  glm45        <tool_call>f\\n<arg_key>k</arg_key>\\n<arg_value>value</arg_value>\\n</tool_call>  (GLM-4.5/4.6)
  llama3       {"name": "f", "parameters": {...}}   as the whole reply, optionally after <|python_tag|>,
               several joined by "; "; or a built-in tool, <|python_tag|>f.call(k="v") (Llama 3.1)
  mistral      [TOOL_CALLS][{"name": "f", "arguments": {...}}, ...]   (v3, Nemo), or, from v11 on,
               [TOOL_CALLS]f[ARGS]{...}  (optionally f[CALL_ID]abcdefghi[ARGS]{...}), one per call
  granite      <|tool_call|>[{"name": "f", "arguments": {...}}, ...]   (Granite 3.x)
  deepseek_v3  <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\\n```json\\n{...}\\n```
               <｜tool▁call▁end｜>...<｜tool▁calls▁end｜>   (V3, R1); deepseek_v31 writes
               <｜tool▁call▁begin｜>f<｜tool▁sep｜>{...}<｜tool▁call▁end｜> (V3.1)
  gpt_oss      <|channel|>commentary to=functions.f <|constrain|>json<|message|>{...}<|call|>  (harmony;
               the channel splitter in mlxrun.parsing.harmony hands call messages over in this form)
  json         a bare call object as the reply (templates that mention tools in no known syntax)
Detection goes by template signatures, most specific first (Qwen3-Coder and GLM also write
<tool_call>); the parser of a format reads every syntax of its family.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

from ..errors import InvalidRequestError
from .harmony import HARMONY_TOKENS
from .reasoning import template_texts

__all__ = ["ToolFormat", "detect_tool_format", "tool_format_by_name"]

# DeepSeek's markers (fullwidth bars, "▁" for spaces), as its tokenizer spells them.
DS_CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
DS_CALLS_END = "<｜tool▁calls▁end｜>"
DS_CALL_BEGIN = "<｜tool▁call▁begin｜>"
DS_CALL_END = "<｜tool▁call▁end｜>"
DS_SEP = "<｜tool▁sep｜>"
HARMONY_CALL = "<|channel|>commentary to=functions."


@dataclass(frozen=True)
class ToolFormat:
    name: str  # a key of the registry below
    call_start: str | None  # the marker that opens a call block
    call_end: str | None = None  # the marker that closes it
    args_key: str = "arguments"  # the member the grammar writes the arguments under
    bare_json: bool = False  # a call may be a bare JSON object (reply start, or after a call)
    args_marker: str | None = None  # "[ARGS]": the grammar writes name[ARGS]{...}
    call_id_marker: str | None = None  # "[CALL_ID]": ... and may put a call id before [ARGS]
    token_ids: tuple[tuple[str, int], ...] = ()  # markers that are added tokens, and their ids
    syntax: str = "json"  # how a block reads: json, python_tag, xml, glm, deepseek, harmony
    markers: tuple[str, ...] = ()  # the syntax's other markers (matched as tokens when added)
    variant: str = ""  # deepseek: "v3" (fenced JSON after "function<sep>name") or "v31"
    alt_start: str | None = None  # a call the model began without call_start (read, not forced)


_FORMATS: dict[str, ToolFormat] = {
    "hermes": ToolFormat("hermes", "<tool_call>", "</tool_call>"),
    # Qwen3-Coder often drops the opening <tool_call> (keeping the closing one): <function= alone
    # opens a call too.
    "qwen3_coder": ToolFormat(
        "qwen3_coder", "<tool_call>", "</tool_call>", syntax="xml", alt_start="<function="
    ),
    "glm45": ToolFormat(
        "glm45",
        "<tool_call>",
        "</tool_call>",
        syntax="glm",
        markers=("<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>"),
    ),
    "llama3": ToolFormat(
        "llama3", "<|python_tag|>", args_key="parameters", bare_json=True, syntax="python_tag"
    ),
    "mistral": ToolFormat("mistral", "[TOOL_CALLS]"),
    "granite": ToolFormat("granite", "<|tool_call|>"),
    "deepseek_v3": ToolFormat(
        "deepseek_v3",
        DS_CALLS_BEGIN,
        DS_CALLS_END,
        syntax="deepseek",
        markers=(DS_CALL_BEGIN, DS_SEP, DS_CALL_END),
        variant="v3",
    ),
    "gpt_oss": ToolFormat("gpt_oss", HARMONY_CALL, "<|call|>", syntax="harmony"),
    "json": ToolFormat("json", None, bare_json=True),
}
_FORMATS["deepseek_v31"] = replace(_FORMATS["deepseek_v3"], name="deepseek_v31", variant="v31")
_FORMATS["gpt_oss"] = replace(_FORMATS["gpt_oss"], markers=HARMONY_TOKENS)
_ALIASES = {
    "qwen": "hermes",
    "qwen3_xml": "qwen3_coder",
    "llama": "llama3",
    "llama3_json": "llama3",
    "glm4_moe": "glm45",
    "glm": "glm45",
    "deepseek": "deepseek_v3",
    "deepseek_r1": "deepseek_v3",
    "openai": "gpt_oss",
    "harmony": "gpt_oss",
}


def _bind(fmt: ToolFormat, tokenizer: Any) -> ToolFormat:
    """`fmt` with the Mistral variant and the marker token ids of this tokenizer."""
    templates = "\n".join(template_texts(tokenizer))
    if fmt.name == "mistral":  # v7 vocabularies reserve [ARGS] but their templates write lists
        args = "[ARGS]" if "[ARGS]" in templates else None
        call_id = "[CALL_ID]" if args and "[CALL_ID]" in templates else None
        fmt = replace(fmt, args_marker=args, call_id_marker=call_id)
    added = {t.content: i for i, t in tokenizer.backend.added_tokens_decoder.items()}
    markers = (fmt.call_start, fmt.call_end, fmt.args_marker, fmt.call_id_marker, *fmt.markers)
    ids = tuple((m, added[m]) for m in dict.fromkeys(markers) if m is not None and m in added)
    return replace(fmt, token_ids=ids)


# Template signatures, most specific first: Qwen3-Coder and GLM also write <tool_call>.
_SIGNATURES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("[TOOL_CALLS]",), "mistral"),
    (("<|channel|>", "<|message|>", "commentary"), "gpt_oss"),
    ((DS_CALLS_BEGIN, "```json"), "deepseek_v3"),
    ((DS_CALLS_BEGIN,), "deepseek_v31"),
    (("<tool_call>", "<arg_key>"), "glm45"),
    (("<tool_call>", "<function="), "qwen3_coder"),
    (("<|tool_call|>",), "granite"),
    (("<tool_call>",), "hermes"),
    (("<|python_tag|>",), "llama3"),
    (('"parameters"',), "llama3"),
)
_VOCAB_MARKERS = {
    "[TOOL_CALLS]": "mistral",
    DS_CALLS_BEGIN: "deepseek_v31",
    "<|tool_call|>": "granite",
    "<tool_call>": "hermes",
    "<|python_tag|>": "llama3",
}


def detect_tool_format(tokenizer: Any) -> ToolFormat | None:
    """The format the chat template asks for, else (if it mentions tools) the vocabulary's."""
    templates = "\n".join(template_texts(tokenizer))
    name = next((n for sig, n in _SIGNATURES if all(s in templates for s in sig)), None)
    if name is None and re.search(r"\btools\b", templates):
        vocab = tokenizer.backend.get_vocab()
        name = next((n for m, n in _VOCAB_MARKERS.items() if m in vocab), "json")
    return None if name is None else _bind(_FORMATS[name], tokenizer)


def tool_format_by_name(name: str, tokenizer: Any = None) -> ToolFormat:
    """A format by name (--tool-parser), bound to `tokenizer` when given."""
    fmt = _FORMATS.get(_ALIASES.get(name, name))
    if fmt is None:
        raise InvalidRequestError(
            f"unknown tool-call format {name!r}",
            param="tool_parser",
            hint=f"Use one of: {', '.join(sorted(_FORMATS))}.",
        )
    return fmt if tokenizer is None else _bind(fmt, tokenizer)
