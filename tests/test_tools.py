"""Tool calls: format detection, the streaming parser and the call grammar.

Detection runs on the fixture BPE tokenizer (ChatML + tools template, <tool_call> added tokens)
and on copies of it given Llama 3.1 / Mistral style templates and control tokens. Each template's
own rendering of an assistant tool call must parse back into that call. The grammar is checked
with llguidance itself: valid calls are accepted token by token, invalid ones are not, and random
walks through the token mask end in calls that parse and validate with jsonschema.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import jsonschema
import llguidance
import llguidance.hf
import llguidance.numpy as llnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from fixtures import build_tokenizer
from mlxrun.errors import InvalidRequestError
from mlxrun.parsing.jsonstream import DONE, ERROR, MORE, VALUE_END, VALUE_START, Cursor, JsonReader
from mlxrun.parsing.reasoning import ReasoningFormat, ReasoningParser, detect_reasoning
from mlxrun.parsing.tools import (
    ToolCall,
    ToolCallDelta,
    ToolFormat,
    ToolParser,
    detect_tool_format,
    parse_tool_calls,
    tool_call_grammar,
    tool_format_by_name,
)
from mlxrun.tokenizer import Tokenizer, load_tokenizer

# --- templates shaped like the real ones ----------------------------------------------------------

LLAMA31_TEMPLATE = """\
{{- bos_token }}
{%- if tools %}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\nEnvironment: ipython\\n' }}
{{- 'Given the following functions, please respond with a JSON for a function call with its ' }}
{{- 'proper arguments that best answers the given prompt.\\n\\nRespond in the format ' }}
{{- '{"name": function name, "parameters": dictionary of argument name and its value}.\\n\\n' }}
{%- for t in tools %}{{- t | tojson(indent=4) + '\\n\\n' }}{%- endfor %}{{- '<|eot_id|>' }}
{%- endif %}
{%- for message in messages %}
{%- if message.tool_calls %}
{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- set tool_call = message.tool_calls[0].function %}
{%- if builtin_tools is defined %}{{- '<|python_tag|>' + tool_call.name + '.call(' }}{%- endif %}
{{- '{"name": "' + tool_call.name + '", "parameters": ' + tool_call.arguments | tojson + '}' }}
{{- '<|eot_id|>' }}
{%- else %}
{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' + message.content }}
{{- '<|eot_id|>' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""
LLAMA_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|python_tag|>")

# Mistral's user turn; v3 writes a space after [AVAILABLE_TOOLS] and [INST], v11+ does not.
MISTRAL_USER = """\
{{- bos_token }}
{%- for message in messages %}
{%- if message.role == 'user' %}
{%- if tools and loop.first %}{{- '[AVAILABLE_TOOLS]_' + tools | tojson + '[/AVAILABLE_TOOLS]' }}
{%- endif %}
{{- '[INST]_' + message.content + '[/INST]' }}
{%- elif message.tool_calls %}
"""
# Mistral v3 (7B-Instruct-v0.3): a JSON list after [TOOL_CALLS], ids of 9 characters.
MISTRAL_V3_TEMPLATE = (
    MISTRAL_USER.replace("]_'", "] '")
    + """\
{{- '[TOOL_CALLS] [' }}
{%- for tool_call in message.tool_calls %}
{%- set out = tool_call.function | tojson %}{{- out[:-1] + ', "id": "' + tool_call.id + '"}' }}
{%- if not loop.last %}{{- ', ' }}{%- else %}{{- ']' + eos_token }}{%- endif %}
{%- endfor %}
{%- endif %}
{%- endfor %}
"""
)
# Mistral v11+ (Magistral, Devstral): one [TOOL_CALLS]name[CALL_ID]id[ARGS]{...} per call.
MISTRAL_V13_TEMPLATE = (
    MISTRAL_USER.replace("]_'", "]'")
    + """\
{%- for tool_call in message.tool_calls %}
{{- '[TOOL_CALLS]' + tool_call.function.name + '[CALL_ID]' + tool_call.id }}
{{- '[ARGS]' + tool_call.function.arguments | tojson }}
{%- endfor %}{{- eos_token }}
{%- endif %}
{%- endfor %}
"""
)
MISTRAL_TOKENS = ("[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]")
MISTRAL_V13_TOKENS = (*MISTRAL_TOKENS, "[ARGS]", "[CALL_ID]")

PLAIN_TEMPLATE = """\
{%- for message in messages %}{{- message.role + ': ' + message.content + '\\n' }}{%- endfor %}
"""
TOOLS_ONLY_TEMPLATE = """\
{%- if tools %}{{- 'Functions: ' + tools | tojson + '\\n' }}{%- endif %}
{%- for message in messages %}{{- message.role + ': ' + message.content + '\\n' }}{%- endfor %}
"""

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 8},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
    },
    "required": ["city"],
    "additionalProperties": False,
}
ADD = {
    "type": "object",
    "properties": {
        "a": {"type": "integer"},
        "b": {"type": "number"},
        "exact": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 2},
        "note": {
            "type": "object",
            "properties": {"text": {"type": "string", "maxLength": 4}},
            "additionalProperties": False,
        },
    },
    "required": ["a", "b"],
    "additionalProperties": False,
}
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
TOOLS = [  # OpenAI tool objects; the grammar passes over their descriptions
    {"type": "function", "function": {"name": n, "description": n.upper(), "parameters": s}}
    for n, s in SCHEMAS.items()
]


@pytest.fixture(scope="module")
def bpe_path(checkpoint_factory: Callable[..., Path]) -> Path:
    return checkpoint_factory("llama", tokenizer="bpe")


@pytest.fixture(scope="module")
def hermes_tok(bpe_path: Path) -> Tokenizer:
    return load_tokenizer(bpe_path)


def variant(path: Path, template: str, added: tuple[str, ...] = ()) -> Tokenizer:
    """The fixture tokenizer with another chat template and extra control tokens."""
    backend = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    backend.chat_template = template
    if added:
        backend.add_tokens(list(added), special_tokens=True)
    return Tokenizer(backend, path)


@pytest.fixture(scope="module")
def llama_tok(bpe_path: Path) -> Tokenizer:
    return variant(bpe_path, LLAMA31_TEMPLATE, LLAMA_TOKENS)


@pytest.fixture(scope="module")
def mistral_tok(bpe_path: Path) -> Tokenizer:
    return variant(bpe_path, MISTRAL_V3_TEMPLATE, MISTRAL_TOKENS)


@pytest.fixture(scope="module")
def mistral13_tok(bpe_path: Path) -> Tokenizer:
    return variant(bpe_path, MISTRAL_V13_TEMPLATE, MISTRAL_V13_TOKENS)


# --- detection ------------------------------------------------------------------------------------


def test_fixture_tokenizer_is_hermes_with_marker_tokens(hermes_tok: Tokenizer) -> None:
    fmt = detect_tool_format(hermes_tok)
    assert fmt is not None and fmt.name == "hermes"
    vocab = hermes_tok.backend.get_vocab()
    assert dict(fmt.token_ids) == {m: vocab[m] for m in ("<tool_call>", "</tool_call>")}


def test_synthetic_templates_detect_their_format(
    tmp_path: Path,
    bpe_path: Path,
    llama_tok: Tokenizer,
    mistral_tok: Tokenizer,
    mistral13_tok: Tokenizer,
) -> None:
    llama = detect_tool_format(llama_tok)
    assert llama is not None and (llama.name, llama.args_key) == ("llama3", "parameters")
    assert dict(llama.token_ids) == {
        "<|python_tag|>": llama_tok.backend.get_vocab()["<|python_tag|>"]
    }
    v3 = detect_tool_format(mistral_tok)
    assert v3 is not None and (v3.name, v3.args_marker, v3.call_id_marker) == (
        "mistral",
        None,
        None,
    )
    v13 = detect_tool_format(mistral13_tok)
    assert v13 is not None and (v13.args_marker, v13.call_id_marker) == ("[ARGS]", "[CALL_ID]")
    assert {m for m, _ in v13.token_ids} == {"[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"}
    assert detect_tool_format(variant(bpe_path, PLAIN_TEMPLATE)) is None
    generic = detect_tool_format(variant(bpe_path, TOOLS_ONLY_TEMPLATE))
    assert generic is not None and generic.name == "hermes"  # the vocab has <tool_call>
    # The SentencePiece fixture has no marker tokens: a template that only lists tools gets the
    # bare JSON call format.
    build_tokenizer(tmp_path / "spm", "spm")
    spm = detect_tool_format(variant(tmp_path / "spm", TOOLS_ONLY_TEMPLATE))
    assert spm is not None and (spm.name, spm.call_start, spm.token_ids) == ("json", None, ())


def test_format_by_name(hermes_tok: Tokenizer, mistral13_tok: Tokenizer) -> None:
    assert tool_format_by_name("qwen").name == "hermes"
    assert tool_format_by_name("hermes", hermes_tok) == detect_tool_format(hermes_tok)
    assert tool_format_by_name("mistral", mistral13_tok).args_marker == "[ARGS]"
    with pytest.raises(InvalidRequestError) as e:
        tool_format_by_name("nope")
    assert e.value.param == "tool_parser" and "hermes" in e.value.hint


CALLS = [
    {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}},
    {"name": "add", "arguments": {"a": 1, "b": 2.5, "tags": ["x"], "note": {"text": "é"}}},
]


@pytest.mark.parametrize("which", ["hermes", "llama", "mistral", "mistral13"])
def test_template_rendered_calls_parse_back(which: str, request: pytest.FixtureRequest) -> None:
    tok: Tokenizer = request.getfixturevalue(f"{which}_tok")
    calls = CALLS[:1] if which == "llama" else CALLS  # Llama 3.1 writes one call per turn
    history = [{"role": "user", "content": "Hi"}]
    reply = {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"id": f"abcdefgh{k}", "type": "function", "function": c} for k, c in enumerate(calls)
        ],
    }
    prompt = tok.render_chat(history, tools=TOOLS)
    full = tok.render_chat([*history, reply], tools=TOOLS, add_generation_prompt=False)
    assert full.startswith(prompt)
    text = full[len(prompt) :]
    for end in ("<|im_end|>\n", "<|eot_id|>", tok.backend.eos_token):
        text = text.removesuffix(end)
    fmt = detect_tool_format(tok)
    assert fmt is not None
    content, parsed = parse_tool_calls(fmt, text, tool_names=SCHEMAS)
    assert content == ""
    assert [(c.name, json.loads(c.arguments)) for c in parsed] == [
        (c["name"], c["arguments"]) for c in calls
    ]


# --- the parser: examples -------------------------------------------------------------------------

HERMES = tool_format_by_name("hermes")
LLAMA = tool_format_by_name("llama3")
MISTRAL = tool_format_by_name("mistral")


def pairs(calls: list[ToolCall]) -> list[tuple[str, str]]:
    return [(c.name, c.arguments) for c in calls]


@pytest.mark.parametrize(
    ("fmt", "text", "content", "calls"),
    [
        (
            HERMES,
            'Let me check.\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city":"Paris",'
            ' "days" : 3}}\n</tool_call>\n<tool_call>\n{"name": "add", "arguments": '
            '{"a": 1e2, "b": -0.50, "tags": ["\\u00e9\\ud83d\\ude00", "\\/"]}}\n</tool_call>',
            "Let me check.",
            [
                ("get_weather", '{"city": "Paris", "days": 3}'),
                ("add", '{"a": 100.0, "b": -0.5, "tags": ["é😀", "/"]}'),
            ],
        ),
        (  # arguments before the name, no arguments at all
            HERMES,
            '<tool_call>{"arguments": {"a": 1}, "name": "add"}</tool_call>'
            '<tool_call>{"name": "get_weather"}</tool_call> done',
            "done",
            [("add", '{"a": 1}'), ("get_weather", "{}")],
        ),
        (  # Llama 3: bare JSON at the start, "; " between calls, or after <|python_tag|>
            LLAMA,
            ' {"name": "add", "parameters": {"a": 1}}; {"name": "add", "parameters": {}}'
            '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Rome"}}',
            "",
            [("add", '{"a": 1}'), ("add", "{}"), ("get_weather", '{"city": "Rome"}')],
        ),
        (LLAMA, 'Use {"name": "add", "parameters": {}} mid-text', None, []),
        (LLAMA, '{"answer": 42, "name": "add"}', None, []),
        (
            MISTRAL,
            'Sure [TOOL_CALLS] [{"name": "add", "arguments": {"a": 1}, "id": "abcdefghi"}, '
            '{"name": "get_weather", "arguments": {"city": "Oslo"}}]',
            "Sure",
            [("add", '{"a": 1}'), ("get_weather", '{"city": "Oslo"}')],
        ),
        (
            MISTRAL,
            '[TOOL_CALLS]add[ARGS]{"a": 1}[TOOL_CALLS]get_weather[CALL_ID]abcdefghi[ARGS]{}',
            "",
            [("add", '{"a": 1}'), ("get_weather", "{}")],
        ),
        # Not calls: they come back as content, unchanged.
        (HERMES, "if a < b and b <tool then <tool_cal", None, []),
        (HERMES, '<tool_call>\n{"name": "add", "arguments": {"a": 1,}}\n</tool_call>', None, []),
        (HERMES, '<tool_call>{"name": "add", "arguments": "{\\"a\\": 1}"}</tool_call>', None, []),
        (HERMES, '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', None, []),
        (HERMES, '<tool_call>{"name": ["add"], "arguments": {}}</tool_call>', None, []),
        (HERMES, '<tool_call>\n{"name": "add", "arguments": {"a": 1', None, []),
        (MISTRAL, "[TOOL_CALLS]add[ARG", None, []),
        (
            MISTRAL,
            '[TOOL_CALLS]add[TOOL_CALLS]add[ARGS]{"a": 2}',
            "[TOOL_CALLS]add",
            [("add", '{"a": 2}')],
        ),
    ],
)
def test_parse_examples(
    fmt: ToolFormat, text: str, content: str | None, calls: list[tuple[str, str]]
) -> None:
    got_content, got_calls = parse_tool_calls(fmt, text, tool_names=SCHEMAS)
    assert got_content == (text if content is None else content)
    assert pairs(got_calls) == calls
    assert all(
        c.id.startswith("call_") and len(c.id) == 29 and c.id[5:].isalnum() for c in got_calls
    )


def test_unknown_names_pass_without_a_tool_list() -> None:
    text = '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>'
    assert pairs(parse_tool_calls(HERMES, text)[1]) == [("rm_rf", "{}")]


def test_arguments_stream_before_the_call_ends() -> None:
    parser = ToolParser(HERMES)
    assert parser.push("Hi <tool_") == ("Hi", [])
    content, deltas = parser.push('call>\n{"name": "add", "arguments": {"a": 12')
    assert content == ""
    assert len(deltas) == 1 and (deltas[0].index, deltas[0].name) == (0, "add")
    assert deltas[0].id is not None and deltas[0].arguments == '{"a": '  # 12 may go on
    assert parser.push(', "b": 1}') == ("", [ToolCallDelta(0, arguments='12, "b": 1}')])
    assert parser.calls == []  # complete only once the call object closes
    assert parser.push("}\n</tool_call>") == ("", [])
    assert pairs(parser.calls) == [("add", '{"a": 12, "b": 1}')]
    assert parser.calls[0].id == deltas[0].id
    assert parser.finish() == ("", [])


def test_a_call_cut_off_comes_back_as_content() -> None:
    parser = ToolParser(HERMES)
    text = '<tool_call>\n{"name": "add", "arguments": {"a": [1, '
    content, deltas = parser.push(text)
    assert content == "" and deltas[0].arguments == '{"a": [1'  # ", " waits for the next item
    assert parser.finish() == (text, [])  # its deltas were sent, but it never became a call
    assert parser.calls == []


# --- the parser: properties -----------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**20), 10**20)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)
ARGS = st.dictionaries(st.text(max_size=5), JSON_VALUES, max_size=3)
STYLES = st.sampled_from(
    [{}, {"separators": (",", ":")}, {"indent": 1}, {"ensure_ascii": False}, {"indent": "\t"}]
)
NAMES = st.sampled_from(["get_weather", "add", "a.b-c_1"])
FRAGMENTS = {
    "hermes": ["<tool_call>", "<tool", "</tool_call>", "<", ">", "{", "}"],
    "llama3": ["<|python_tag|>", "<|python", "<|", "{", "}", "]"],
    "mistral": ["[TOOL_CALLS]", "[TOOL_", "[ARGS]", "[", "]", "{", "}"],
}
TEXT_CHARS = 'ab \n\t<>{}[]":,é'


def render(fmt: str, calls: list[tuple[str, dict, dict]], form: int) -> str:
    """Calls written the way `fmt`'s models write them (several syntaxes per family)."""
    objs = [
        json.dumps({"name": n, "parameters" if fmt == "llama3" else "arguments": a}, **style)
        for n, a, style in calls
    ]
    if fmt == "hermes":
        return "".join(f"<tool_call>{chr(10) * form}{o}{chr(10) * form}</tool_call>" for o in objs)
    if fmt == "llama3":
        return "<|python_tag|>" + "; ".join(objs)
    if form == 0:
        return "[TOOL_CALLS] [" + ", ".join(objs) + "]"
    return "".join(f"[TOOL_CALLS]{n}[ARGS]{json.dumps(a, **s)}" for n, a, s in calls)


@st.composite
def replies(draw: st.DrawFn, fmt: str) -> tuple[str, list[tuple[str, str]], str]:
    """(text, expected calls, expected content without whitespace)."""
    chars = TEXT_CHARS.replace(";", "")
    text_part = st.lists(st.sampled_from(FRAGMENTS[fmt]) | st.text(chars, max_size=4), max_size=4)
    parts, calls, content = [], [], []
    for _ in range(draw(st.integers(0, 4))):
        if draw(st.booleans()):
            piece = "".join(draw(text_part))
            parts.append(piece)
            content.append(piece)
        else:
            group = draw(st.lists(st.tuples(NAMES, ARGS, STYLES), min_size=1, max_size=2))
            parts.append(render(fmt, group, draw(st.integers(0, 1))))
            calls += [(n, json.dumps(a, ensure_ascii=False)) for n, a, _ in group]
    return "".join(parts), calls, "".join("".join(content).split())


def stream(
    fmt: ToolFormat, text: str, cuts: list[int]
) -> tuple[str, list[ToolCallDelta], list[ToolCall]]:
    parser = ToolParser(fmt)
    bounds = [0, *sorted(c % (len(text) + 1) for c in cuts), len(text)]
    content, deltas = [], []
    for a, b in zip(bounds, bounds[1:], strict=False):
        c, d = parser.push(text[a:b])
        content.append(c)
        deltas += d
    c, d = parser.finish()
    return "".join(content) + c, deltas + d, parser.calls


def reassemble(deltas: list[ToolCallDelta]) -> list[tuple[str | None, str | None, str]]:
    calls: dict[int, list] = {}
    for d in deltas:
        if d.index not in calls:
            assert d.id is not None and d.name is not None
            calls[d.index] = [d.id, d.name, ""]
        else:
            assert d.id is None and d.name is None
        calls[d.index][2] += d.arguments
    assert sorted(calls) == list(range(len(calls)))
    return [tuple(calls[k]) for k in sorted(calls)]


@pytest.mark.parametrize("fmt", [HERMES, LLAMA, MISTRAL], ids=lambda f: f.name)
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), cuts=st.lists(st.integers(0, 10**6), max_size=12))
def test_any_split_gives_the_whole_text_result(
    fmt: ToolFormat, data: st.DataObject, cuts: list[int]
) -> None:
    text, expected, content_chars = data.draw(replies(fmt.name))
    content, calls = parse_tool_calls(fmt, text)
    assert pairs(calls) == expected
    assert "".join(content.split()) == content_chars  # content kept, up to whitespace by calls
    s_content, deltas, s_calls = stream(fmt, text, cuts)
    assert (s_content, pairs(s_calls)) == (content, pairs(calls))
    assert reassemble(deltas) == [(c.id, c.name, c.arguments) for c in s_calls]


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(TEXT_CHARS + "<tool_call>", max_size=40),
    cuts=st.lists(st.integers(0, 99), max_size=8),
)
def test_text_without_calls_passes_through(text: str, cuts: list[int]) -> None:
    content, calls = parse_tool_calls(HERMES, text)
    assert (content, calls) == (text, [])  # no "name" can be spelt with these characters
    s_content, deltas, s_calls = stream(HERMES, text, cuts)
    assert (s_content, pairs(s_calls)) == (content, pairs(calls))


# --- the streaming JSON reader -------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(obj=ARGS, style=STYLES, cuts=st.lists(st.integers(0, 10**6), max_size=8))
def test_json_reader_rewrites_an_object_fed_in_pieces(obj: dict, style: dict, cuts: list[int]):
    text = json.dumps(obj, **style) + " after"
    reader, cur, events = JsonReader(), Cursor(), []
    for end in sorted({c % len(text) for c in cuts} | {len(text)}):
        cur.s = text[:end]  # more text arrives; cur.i stays where reading stopped
        while (ev := reader.feed(cur)) not in (MORE, DONE):
            assert ev != ERROR
            start = reader.value_start if ev == VALUE_START else None
            events.append((ev, reader.key, reader.first_char, start, len(reader.pieces)))
        if ev == DONE:
            break
    assert ev == DONE and text[cur.i :] == " after"
    assert "".join(reader.pieces) == json.dumps(obj, ensure_ascii=False)
    starts, ends = events[0::2], events[1::2]
    assert [e[0] for e in starts] == [VALUE_START] * len(obj)
    assert [e[0] for e in ends] == [VALUE_END] * len(obj)
    for (_, key, first, at, _), (_, _, _, _, upto) in zip(starts, ends, strict=True):
        value = json.dumps(obj[key], ensure_ascii=False)
        assert first == json.dumps(obj[key])[0] and "".join(reader.pieces[at:upto]) == value


@pytest.mark.parametrize(
    "text", ['[{"a": 1}]', '{"a" 1}', '{"a": tru}', '{"a": 01x}', '{"a": "\\q"}']
)
def test_json_reader_stops_at_what_is_not_json(text: str) -> None:
    reader, cur = JsonReader(), Cursor()
    cur.s = text
    while (ev := reader.feed(cur)) in (VALUE_START, VALUE_END):
        pass
    assert ev == ERROR


# --- the grammar ----------------------------------------------------------------------------------


def ll_tokenizer(tok: Tokenizer) -> llguidance.LLTokenizer:
    eos = sorted(tok.eos_token_ids | {tok.backend.eos_token_id})
    return llguidance.hf.from_tokenizer(tok.backend, n_vocab=tok.vocab_size, eos_token=eos)


def matcher(lltok: llguidance.LLTokenizer, grammar: str) -> llguidance.LLMatcher:
    m = llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_lark(grammar), log_level=0)
    assert not m.is_error(), m.get_error()
    return m


def accepts(tok: Tokenizer, lltok: llguidance.LLTokenizer, grammar: str, text: str) -> bool:
    m = matcher(lltok, grammar)
    return m.consume_tokens(tok.encode(text, add_special_tokens=False)) and m.is_accepting()


def test_grammar_accepts_valid_calls_only(hermes_tok: Tokenizer) -> None:
    fmt = detect_tool_format(hermes_tok)
    assert fmt is not None
    lltok = ll_tokenizer(hermes_tok)
    one = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>'
    two = one + '\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2.5}}\n</tool_call>'
    anyone = tool_call_grammar(fmt, TOOLS)
    assert accepts(hermes_tok, lltok, anyone, one)
    assert accepts(hermes_tok, lltok, anyone, two)
    assert not accepts(hermes_tok, lltok, anyone, one.replace("get_weather", "get_wether"))
    assert not accepts(hermes_tok, lltok, anyone, one.replace('"city": "Paris", ', ""))  # required
    assert not accepts(hermes_tok, lltok, anyone, one.replace('"days": 3', '"days": 30'))
    assert not accepts(
        hermes_tok, lltok, anyone, one.replace('"city": ', '"city":')
    )  # tojson style
    assert not accepts(hermes_tok, lltok, anyone, "Sure. " + one)
    assert not accepts(hermes_tok, lltok, tool_call_grammar(fmt, TOOLS, parallel=False), two)
    named = tool_call_grammar(fmt, TOOLS, choice="add")
    assert not accepts(hermes_tok, lltok, named, one)
    assert accepts(hermes_tok, lltok, named, two[len(one) + 1 :])


def random_walk(
    m: llguidance.LLMatcher,
    lltok: llguidance.LLTokenizer,
    rng: np.random.Generator,
    prefer: int | None = None,
) -> list[int]:
    """Tokens picked uniformly from the grammar's mask until it stops (EOS included); `prefer`,
    when allowed, is picked one time in five (so that free text ends)."""
    mask = llnp.allocate_token_bitmask(1, lltok.vocab_size)
    tokens: list[int] = []
    while not m.is_stopped():
        assert len(tokens) < 2000, "the walk does not end"
        llnp.fill_next_token_bitmask(m, mask)
        bits = np.unpackbits(mask[0].view(np.uint8), bitorder="little")[: lltok.vocab_size]
        allowed = np.flatnonzero(bits)
        token = int(rng.choice(allowed))
        if prefer is not None and prefer in allowed and rng.random() < 0.2:
            token = prefer
        assert m.consume_token(token), m.get_error()
        tokens.append(token)
    assert m.is_accepting() and not m.is_error()
    return [t for t in tokens if t not in lltok.eos_tokens]


@pytest.mark.parametrize("which", ["hermes", "llama", "mistral", "mistral13"])
@pytest.mark.parametrize(("choice", "parallel"), [(None, True), ("add", False)])
def test_random_walks_give_valid_calls(
    which: str, choice: str | None, parallel: bool, request: pytest.FixtureRequest
) -> None:
    tok: Tokenizer = request.getfixturevalue(f"{which}_tok")
    fmt = detect_tool_format(tok)
    assert fmt is not None
    lltok = ll_tokenizer(tok)
    grammar = tool_call_grammar(fmt, TOOLS, choice=choice, parallel=parallel)
    rng = np.random.default_rng(len(which))
    names = set()
    for _ in range(12):
        text = tok.decode(random_walk(matcher(lltok, grammar), lltok, rng))
        content, calls = parse_tool_calls(fmt, text, tool_names=SCHEMAS)
        assert content == "" and calls, text
        assert parallel or len(calls) == 1
        for call in calls:
            assert choice in (None, call.name)
            args = json.loads(call.arguments)
            jsonschema.validate(args, SCHEMAS[call.name])
            normal = json.dumps(args, ensure_ascii=False)
            if "Infinity" not in normal:  # json.dumps writes overflowing numbers as non-JSON
                assert call.arguments == normal
            names.add(call.name)
    assert names == ({choice} if choice else set(SCHEMAS))


def test_grammar_errors_name_the_problem(hermes_tok: Tokenizer) -> None:
    fmt = detect_tool_format(hermes_tok)
    assert fmt is not None
    unique = {"type": "object", "properties": {"ids": {"type": "array", "uniqueItems": True}}}
    with pytest.raises(InvalidRequestError) as e:
        tool_call_grammar(
            fmt, [{"type": "function", "function": {"name": "f", "parameters": unique}}]
        )
    assert (
        e.value.param == "tools" and "uniqueItems" in e.value.message and "'f'" in e.value.message
    )
    lookaround = {"type": "object", "properties": {"s": {"type": "string", "pattern": "(?=a)b"}}}
    with pytest.raises(InvalidRequestError, match="look-around"):
        tool_call_grammar(fmt, [{"function": {"name": "g", "parameters": lookaround}}])
    with pytest.raises(InvalidRequestError, match="type object") as e:
        tool_call_grammar(fmt, [{"function": {"name": "h", "parameters": {"type": "string"}}}])
    with pytest.raises(InvalidRequestError) as e:
        tool_call_grammar(fmt, TOOLS, choice="nope")
    assert e.value.param == "tool_choice"
    no_params = tool_call_grammar(fmt, [{"type": "function", "function": {"name": "now"}}])
    lltok = ll_tokenizer(hermes_tok)
    call = '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>'
    assert accepts(hermes_tok, lltok, no_params, call)
    assert not accepts(hermes_tok, lltok, no_params, call.replace("{}", '{"x": 1}'))


def test_grammar_allows_a_thinking_block_first(bpe_path: Path, hermes_tok: Tokenizer) -> None:
    call = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    thought = "<think>\nadd them\n</think>\n\n" + call
    opened = "add them\n</think>\n\n" + call
    with_tokens = variant(bpe_path, hermes_tok.chat_template or "", ("<think>", "</think>"))
    as_tokens = detect_reasoning(with_tokens)
    assert as_tokens is not None and len(as_tokens.token_ids) == 2
    # Think markers as added tokens, then as plain text (the fixture has no such tokens).
    for t, closed in ((with_tokens, as_tokens), (hermes_tok, ReasoningFormat())):
        fmt, lltok = detect_tool_format(t), ll_tokenizer(t)
        assert fmt is not None
        grammar = tool_call_grammar(fmt, TOOLS, reasoning=closed)
        assert accepts(t, lltok, grammar, call) and accepts(t, lltok, grammar, thought)
        assert not accepts(t, lltok, grammar, opened)
        grammar = tool_call_grammar(fmt, TOOLS, reasoning=replace(closed, starts_open=True))
        assert accepts(t, lltok, grammar, opened)
        assert not accepts(t, lltok, grammar, call)


@pytest.mark.parametrize("starts_open", [False, True])
def test_random_walks_through_thinking(
    bpe_path: Path, hermes_tok: Tokenizer, starts_open: bool
) -> None:
    tok = variant(bpe_path, hermes_tok.chat_template or "", ("<think>", "</think>"))
    fmt, think = detect_tool_format(tok), detect_reasoning(tok)
    assert fmt is not None and think is not None
    think = replace(think, starts_open=starts_open)
    lltok = ll_tokenizer(tok)
    grammar = tool_call_grammar(fmt, TOOLS, reasoning=think)
    end = dict(think.token_ids)["</think>"]
    rng = np.random.default_rng(7)
    thought = 0
    for _ in range(8):
        text = tok.decode(random_walk(matcher(lltok, grammar), lltok, rng, prefer=end))
        split = ReasoningParser(think)
        reasoning, content = split.push(text)
        more_reasoning, more_content = split.finish()
        thought += bool(reasoning + more_reasoning)
        _, calls = parse_tool_calls(fmt, content + more_content, tool_names=SCHEMAS)
        assert calls, text
        for call in calls:
            jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
    assert (thought > 0) if starts_open else (0 < thought < 8)  # closed: thinking is optional
