"""The tool-call formats beyond JSON-after-a-marker: Qwen3-Coder XML, GLM-4.5, DeepSeek V3/V3.1,
Granite and gpt-oss (harmony), each on a tokenizer that carries the family's chat template (the
token layout of the published one, tests/fixtures/templates) and control tokens.

For each: detection from the template; the template's own rendering of past calls parses back;
any chunking of a reply gives the same content and calls, and the streamed deltas add up to the
calls; random walks through the llguidance mask of the forced-call grammar decode to calls that
validate with jsonschema.
"""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from test_tools import ARGS, SCHEMAS, TOOLS, ll_tokenizer, matcher, random_walk, reassemble

from fixtures.tool_models import FAMILIES, family_tokenizer
from mlxrun.errors import InvalidRequestError
from mlxrun.parsing.harmony import HarmonySplitter
from mlxrun.parsing.reasoning import ReasoningFormat, ReasoningParser, detect_reasoning
from mlxrun.parsing.tool_readers import parameter_value
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

FAMILY_NAMES = sorted(FAMILIES)


@pytest.fixture(scope="module")
def family_toks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Tokenizer]:
    root = tmp_path_factory.mktemp("families")
    return {f: load_tokenizer(family_tokenizer(root / f, f)) for f in FAMILY_NAMES}


def split(tok_or_fmt: Tokenizer | ReasoningFormat | None, text: str) -> tuple[str, str]:
    """(reasoning, content) of a reply, as the server splits it first."""
    fmt = detect_reasoning(tok_or_fmt) if isinstance(tok_or_fmt, Tokenizer) else tok_or_fmt
    if fmt is None:
        return "", text
    parser = ReasoningParser(fmt)
    r, c = parser.push(text)
    r2, c2 = parser.finish()
    return r + r2, c + c2


# --- detection ------------------------------------------------------------------------------------

EXPECTED_TOKENS = {
    "qwen3_coder": {"<tool_call>", "</tool_call>"},
    "glm45": {
        "<tool_call>",
        "</tool_call>",
        "<arg_key>",
        "</arg_key>",
        "<arg_value>",
        "</arg_value>",
    },
    "deepseek_v3": {
        "<｜tool▁calls▁begin｜>",
        "<｜tool▁calls▁end｜>",
        "<｜tool▁call▁begin｜>",
        "<｜tool▁call▁end｜>",
        "<｜tool▁sep｜>",
    },
    "granite": {"<|tool_call|>"},
    "gpt_oss": {
        "<|start|>",
        "<|channel|>",
        "<|message|>",
        "<|constrain|>",
        "<|end|>",
        "<|call|>",
        "<|return|>",
    },
}
EXPECTED_TOKENS["deepseek_v31"] = EXPECTED_TOKENS["deepseek_v3"]
REASONING = {
    "glm45": "think",
    "deepseek_v3": "think",
    "deepseek_v31": "think",
    "gpt_oss": "harmony",
}


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_family_templates_detect_their_format(family: str, family_toks) -> None:
    tok = family_toks[family]
    fmt = detect_tool_format(tok)
    assert fmt is not None and fmt.name == family
    vocab = tok.backend.get_vocab()
    assert dict(fmt.token_ids) == {m: vocab[m] for m in EXPECTED_TOKENS[family]}
    reasoning = detect_reasoning(tok)
    assert (reasoning.kind if reasoning else None) == REASONING.get(family)
    assert tool_format_by_name(family, tok) == fmt


def test_harmony_messages_do_not_end_the_turn(family_toks) -> None:
    """gpt-oss ends each message with <|end|> (Phi-3's end of turn) and its turn with <|return|>
    or <|call|>: stopping at <|end|> would cut every reply after its analysis message."""
    tok = family_toks["gpt_oss"]
    vocab = tok.backend.get_vocab()
    assert vocab["<|end|>"] not in tok.eos_token_ids
    assert vocab["<|return|>"] in tok.eos_token_ids


def test_new_names_and_aliases() -> None:
    for name, canonical in [
        ("qwen3_coder", "qwen3_coder"),
        ("qwen3_xml", "qwen3_coder"),
        ("glm45", "glm45"),
        ("glm4_moe", "glm45"),
        ("deepseek_v3", "deepseek_v3"),
        ("deepseek_r1", "deepseek_v3"),
        ("deepseek_v31", "deepseek_v31"),
        ("granite", "granite"),
        ("gpt_oss", "gpt_oss"),
        ("openai", "gpt_oss"),
        ("harmony", "gpt_oss"),
    ]:
        assert tool_format_by_name(name).name == canonical
    with pytest.raises(InvalidRequestError) as e:
        tool_format_by_name("qwen3coder")
    assert "qwen3_coder" in e.value.hint and "gpt_oss" in e.value.hint


CALLS = [
    {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius", "days": 3}},
    {
        "name": "add",
        "arguments": {"a": 1, "b": 2.5, "exact": True, "tags": ["x"], "note": {"text": "é"}},
    },
]


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_template_rendered_calls_parse_back(family: str, family_toks) -> None:
    tok = family_toks[family]
    calls = CALLS[:1] if family == "gpt_oss" else CALLS  # harmony: one call per message
    # Arguments as objects, the way the server hands them to templates (DeepSeek's templates
    # concatenate them as text: the tokenizer then renders them as JSON text).
    reply = {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"id": f"call{k}", "type": "function", "function": c} for k, c in enumerate(calls)
        ],
    }
    history = [{"role": "user", "content": "Hi"}]
    prompt = tok.render_chat(history, tools=TOOLS)
    full = tok.render_chat([*history, reply], tools=TOOLS, add_generation_prompt=False)
    assert full.startswith(prompt)
    text = full[len(prompt) :]
    for end in ("<|im_end|>\n", "<|end_of_text|>\n", "<｜end▁of▁sentence｜>"):
        text = text.removesuffix(end)
    fmt = detect_tool_format(tok)
    assert fmt is not None
    reasoning, content = split(tok, text)
    assert reasoning == ""
    rest, parsed = parse_tool_calls(fmt, content, tool_names=SCHEMAS)
    assert rest == ""
    assert [(c.name, json.loads(c.arguments)) for c in parsed] == [
        (c["name"], c["arguments"]) for c in calls
    ]


# --- the parsers: examples ------------------------------------------------------------------------

QWEN = tool_format_by_name("qwen3_coder")
GLM = tool_format_by_name("glm45")
DS3 = tool_format_by_name("deepseek_v3")
DS31 = tool_format_by_name("deepseek_v31")
GRANITE = tool_format_by_name("granite")
HARMONY = tool_format_by_name("gpt_oss")
LLAMA = tool_format_by_name("llama3")
HARMONY_REASONING = ReasoningFormat("<|channel|>analysis<|message|>", "<|end|>", kind="harmony")
DS_BEGIN, DS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
DS_CALL, DS_CALL_END, DS_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"


def pairs(calls: list[ToolCall]) -> list[tuple[str, str]]:
    return [(c.name, c.arguments) for c in calls]


def qwen_call(name: str, params: dict[str, str]) -> str:
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


@pytest.mark.parametrize(
    ("fmt", "text", "content", "calls"),
    [
        (  # strings stay text by the schema ("12" for a string, 12 for an integer), multi-line
            QWEN,
            "Checking.\n\n"
            + qwen_call("get_weather", {"city": "12", "days": "12", "unit": "celsius"})
            + "\n"
            + qwen_call("add", {"a": "1", "b": "-0.50", "exact": "True", "tags": '["x"]'}),
            "Checking.",
            [
                ("get_weather", '{"city": "12", "days": 12, "unit": "celsius"}'),
                ("add", '{"a": 1, "b": -0.5, "exact": true, "tags": ["x"]}'),
            ],
        ),
        (  # no newlines around values; a hermes JSON object inside <tool_call> is read too
            QWEN,
            "<tool_call><function=get_weather><parameter=city>a\nb</parameter></function>"
            '</tool_call><tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>',
            "",
            [("get_weather", '{"city": "a\\nb"}'), ("add", '{"a": 1}')],
        ),
        (  # Qwen3-Coder's common slip: no opening <tool_call>, an orphan closing one
            QWEN,
            "I'll check.\n\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n"
            "</function>\n</tool_call>\n<function=add>\n</function> Done.",
            "I'll check.Done.",
            [("get_weather", '{"city": "Oslo"}'), ("add", "{}")],
        ),
        (
            GLM,
            "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value> 7 </arg_value>\n"
            "<arg_key>days</arg_key>\n<arg_value>7</arg_value>\n</tool_call>",
            "",
            [("get_weather", '{"city": " 7 ", "days": 7}')],
        ),
        (  # DeepSeek: both variants, either format
            DS3,
            f'Sure{DS_BEGIN}{DS_CALL}function{DS_SEP}add\n```json\n{{"a": 1}}\n```{DS_CALL_END}\n'
            f'{DS_CALL}get_weather{DS_SEP}{{"city": "Rome"}}{DS_CALL_END}{DS_END}',
            "Sure",
            [("add", '{"a": 1}'), ("get_weather", '{"city": "Rome"}')],
        ),
        (
            DS31,
            f'{DS_BEGIN}{DS_CALL}add{DS_SEP}{{"a": 2}}{DS_CALL_END}{DS_END} done',
            "done",
            [("add", '{"a": 2}')],
        ),
        (
            GRANITE,
            '<|tool_call|>[{"name": "add", "arguments": {"a": 1}}, {"name": "get_weather", '
            '"arguments": {"city": "Oslo"}}]',
            "",
            [("add", '{"a": 1}'), ("get_weather", '{"city": "Oslo"}')],
        ),
        (
            HARMONY,
            '<|channel|>commentary to=functions.add <|constrain|>json<|message|>{"a":3}<|call|>',
            "",
            [("add", '{"a": 3}')],
        ),
        (  # Llama 3.1's built-in tools: NAME.call(key="value") after <|python_tag|>
            LLAMA,
            '<|python_tag|>brave_search.call(query="weather in Paris", count=3)',
            "",
            [("brave_search", '{"query": "weather in Paris", "count": 3}')],
        ),
        # Not calls: they come back as content, unchanged.
        (LLAMA, '<|python_tag|>print("hi")', None, []),
        (LLAMA, "<|python_tag|>brave_search.call(query=x)", None, []),
        (QWEN, qwen_call("rm_rf", {"path": "/"}), None, []),
        (QWEN, "<tool_call>\n<function=add>\n<parameter=a>\n1\n</parameter>\n", None, []),
        (QWEN, "a <function=add> b <tool_cal", None, []),
        (QWEN, "<function=rm_rf>\n</function>\n</tool_call>", None, []),  # not a tool
        (GLM, "<tool_call>add\n<arg_key>a</arg_key>\n<arg_value>1", None, []),
        (DS31, f"{DS_BEGIN}{DS_CALL}add{DS_SEP}[1]{DS_CALL_END}{DS_END}", None, []),
        (HARMONY, "<|channel|>commentary to=functions.nope <|message|>{}<|call|>", None, []),
    ],
)
def test_parse_examples(
    fmt: ToolFormat, text: str, content: str | None, calls: list[tuple[str, str]]
) -> None:
    names = {**SCHEMAS, "brave_search": {}}
    got_content, got_calls = parse_tool_calls(fmt, text, tool_names=names)
    assert got_content == (text if content is None else content)
    assert pairs(got_calls) == calls
    streamed, deltas, s_calls = stream(fmt, text, list(range(0, len(text), 3)), names)
    assert (streamed, pairs(s_calls)) == (got_content, calls)
    ids = {c.id for c in s_calls}
    assert [(n, a) for i, n, a in reassemble(deltas) if i in ids] == calls


def test_parameter_values_follow_the_schema_type() -> None:
    assert parameter_value("007", {"type": "string"}) == "007"
    assert parameter_value("007", {"type": ["string", "null"]}) == "007"
    assert parameter_value("celsius", {"enum": ["celsius"]}) == "celsius"
    assert parameter_value("7", {"type": "integer"}) == 7
    assert parameter_value("False", {"type": "boolean"}) is False
    assert parameter_value('{"a": [1]}', {"type": "object"}) == {"a": [1]}
    assert parameter_value("NaN", {"type": "number"}) == "NaN"  # not JSON: kept as text
    assert parameter_value("7", None) == 7 and parameter_value("Paris", None) == "Paris"


def test_qwen3_coder_streams_one_delta_per_parameter() -> None:
    parser = ToolParser(QWEN, SCHEMAS)
    assert parser.push("Hi <tool_") == ("Hi", [])
    content, deltas = parser.push("call>\n<function=add>\n<parameter=a>\n4")
    assert content == "" and len(deltas) == 1
    assert (deltas[0].index, deltas[0].name, deltas[0].arguments) == (0, "add", "{")
    assert parser.push("2\n</parameter>\n<parameter=b>\n1\n</param") == (
        "",
        [ToolCallDelta(0, arguments='"a": 42')],
    )
    assert parser.push("eter>\n</function>\n") == ("", [ToolCallDelta(0, arguments=', "b": 1')])
    assert parser.calls == []  # complete once the block closes
    assert parser.push("</tool_call>") == ("", [ToolCallDelta(0, arguments="}")])
    assert pairs(parser.calls) == [("add", '{"a": 42, "b": 1}')]
    assert parser.calls[0].id == deltas[0].id


WRITE = {
    "type": "object",
    "properties": {
        "path": {"type": "string"},
        "text": {"type": "string"},
        "n": {"type": "integer"},
    },
}


def test_string_parameters_stream_as_they_come() -> None:
    parser = ToolParser(QWEN, {"write": WRITE})
    _, deltas = parser.push("<tool_call>\n<function=write>\n<parameter=text>\n")
    assert [(d.name, d.arguments) for d in deltas] == [("write", '{"text": "')]
    assert parser.push("def f():\n") == ("", [ToolCallDelta(0, arguments="def f():")])
    # The line break may be the template's own, before </parameter>: it waits.
    assert parser.push("    return 1 < 2\n</para") == (
        "",
        [ToolCallDelta(0, arguments="\\n    return 1 < 2")],
    )
    assert parser.push("meter>\n</function>\n</tool_call>") == (
        "",
        [ToolCallDelta(0, arguments='"}')],
    )
    assert pairs(parser.calls) == [("write", '{"text": "def f():\\n    return 1 < 2"}')]


@pytest.mark.parametrize("fmt", [QWEN, GLM], ids=lambda f: f.name)
@settings(max_examples=120, deadline=None)
@given(
    values=st.lists(
        st.text('a<>/\n é"\\', max_size=12)
        | st.sampled_from(["</parameter", "</arg_value", "\n\n", "</"]),
        min_size=1,
        max_size=3,
    ),
    n=st.integers(0, 99),
    cuts=st.lists(st.integers(0, 10**6), max_size=12),
)
def test_string_parameters_split_anywhere(
    fmt: ToolFormat, values: list[str], n: int, cuts: list[int]
) -> None:
    text = "".join(values)
    assume("</parameter>" not in text and "</arg_value>" not in text)  # no way to write these
    args = {"path": text, "n": n, "text": text[::-1]}
    raw = {k: str(v) for k, v in args.items()}
    call = render(fmt.name, [("write", raw)], 0)
    content, calls = parse_tool_calls(fmt, call, {"write": WRITE})
    assert (content, pairs(calls)) == ("", [("write", json.dumps(args, ensure_ascii=False))])
    s_content, deltas, s_calls = stream(fmt, call, cuts, {"write": WRITE})
    assert (s_content, pairs(s_calls)) == (content, pairs(calls))
    assert reassemble(deltas) == [(c.id, c.name, c.arguments) for c in s_calls]


# --- harmony channels -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "reasoning", "content"),
    [
        (
            "<|channel|>analysis<|message|>Think.<|end|><|start|>assistant<|channel|>final"
            "<|message|>Hello.<|return|>",
            "Think.",
            "Hello.",
        ),
        (  # a preamble on commentary is content; a call keeps its (canonical) markers
            "<|channel|>commentary<|message|>Let me look. <|end|><|start|>assistant to=functions.f"
            '<|channel|>commentary json<|message|>{"a": 1}',
            "",
            "Let me look. <|channel|>commentary to=functions.f <|constrain|>json<|message|>"
            '{"a": 1}<|call|>',
        ),
        (  # built-in tools (python, browser) are the model's own work: reasoning
            "<|channel|>analysis to=python code<|message|>print(1)<|call|>",
            "print(1)",
            "",
        ),
        ("Plain text, no channels.", "", "Plain text, no channels."),
        ("<|channel|>analysis<|message|>cut off", "cut off", ""),
    ],
)
def test_harmony_channels(text: str, reasoning: str, content: str) -> None:
    assert split(HARMONY_REASONING, text) == (reasoning, content)


HARMONY_PIECES = [
    "<|channel|>analysis<|message|>",
    "<|channel|>final<|message|>",
    "<|channel|>commentary<|message|>",
    "<|start|>assistant",
    "<|end|>",
    "<|call|>",
    "<|return|>",
    "<|",
    "to=functions.add ",
]


@settings(max_examples=150, deadline=None)
@given(
    parts=st.lists(st.sampled_from(HARMONY_PIECES) | st.text("ab <|>\n", max_size=5), max_size=8),
    cuts=st.lists(st.integers(0, 400), max_size=8),
)
def test_harmony_any_split_gives_the_same_channels(parts: list[str], cuts: list[int]) -> None:
    text = "".join(parts)
    whole = split(HARMONY_REASONING, text)
    splitter = HarmonySplitter()
    bounds = [0, *sorted(c % (len(text) + 1) for c in cuts), len(text)]
    got = [splitter.push(text[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]
    got.append(splitter.finish())
    assert ("".join(r for r, _ in got), "".join(c for _, c in got)) == whole


# --- any chunking, every format -------------------------------------------------------------------

NAMES = st.sampled_from(["get_weather", "add", "a.b-c_1"])
FRAGMENTS = {
    "qwen3_coder": ["<tool_call>", "<function=add>", "</parameter>", "<", ">", "\n"],
    "glm45": ["<tool_call>", "<arg_key>", "</arg_value>", "<", ">", "\n"],
    "deepseek_v3": [DS_BEGIN, DS_CALL, DS_SEP, "<｜", "{", "}", "```"],
    "granite": ["<|tool_call|>", "<|tool", "[", "]", "{", "}"],
    "gpt_oss": ["<|channel|>commentary", "<|message|>", "<|call|>", "<|", "{", "}"],
}
FORMATS = {f.name: f for f in (QWEN, GLM, DS3, GRANITE, HARMONY)}
TEXT_CHARS = 'ab \n<>{}[]":,é'


def kv_value(value: object) -> str:
    """How the key/value templates write a value: strings raw, the rest as JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def render(fmt: str, calls: list[tuple[str, dict]], form: int) -> str:
    """Calls written the way `fmt`'s models write them."""
    if fmt == "qwen3_coder":
        return "\n".join(qwen_call(n, {k: kv_value(v) for k, v in a.items()}) for n, a in calls)
    if fmt == "glm45":
        return "".join(
            f"<tool_call>{n}\n"
            + "".join(
                f"<arg_key>{k}</arg_key>\n<arg_value>{kv_value(v)}</arg_value>\n"
                for k, v in a.items()
            )
            + "</tool_call>"
            for n, a in calls
        )
    if fmt == "deepseek_v3":
        one = (
            (
                lambda n, a: (
                    f"{DS_CALL}function{DS_SEP}{n}\n```json\n{json.dumps(a)}\n```{DS_CALL_END}"
                )
            )
            if form
            else (lambda n, a: f"{DS_CALL}{n}{DS_SEP}{json.dumps(a, indent=1)}{DS_CALL_END}")
        )
        return DS_BEGIN + "\n".join(one(n, a) for n, a in calls) + DS_END
    if fmt == "granite":
        objs = [{"name": n, "arguments": a} for n, a in calls]
        return "<|tool_call|>" + json.dumps(objs, indent=4 if form else None)
    return "".join(
        f"<|channel|>commentary to=functions.{n} <|constrain|>json<|message|>{json.dumps(a)}<|call|>"
        for n, a in calls
    )


# Keys and string values the key/value syntaxes can carry: no markup, no edge whitespace; without a
# schema a value that spells JSON is read as JSON, so string values here never do.
KV_KEY = st.text("abcé 1", min_size=1, max_size=5).filter(lambda s: s == s.strip())
KV_STR = st.text("abcé ", min_size=1, max_size=5).filter(lambda s: s == s.strip())
KV_ARGS = st.dictionaries(
    KV_KEY,
    KV_STR | st.integers(-9, 99) | st.booleans() | st.lists(st.integers(0, 9), max_size=2),
    max_size=3,
)


@st.composite
def replies(draw: st.DrawFn, fmt: str) -> tuple[str, list[tuple[str, str]], str]:
    """(text, expected calls, expected content without whitespace)."""
    args = KV_ARGS if fmt in ("qwen3_coder", "glm45") else ARGS
    text_part = st.lists(
        st.sampled_from(FRAGMENTS[fmt]) | st.text(TEXT_CHARS, max_size=4), max_size=4
    )
    parts, calls, content = [], [], []
    for _ in range(draw(st.integers(0, 4))):
        if draw(st.booleans()):
            piece = "".join(draw(text_part))
            parts.append(piece)
            content.append(piece)
        else:
            group = draw(st.lists(st.tuples(NAMES, args), min_size=1, max_size=2))
            parts.append(render(fmt, group, draw(st.integers(0, 1))))
            calls += [(n, json.dumps(a, ensure_ascii=False)) for n, a in group]
    return "".join(parts), calls, "".join("".join(content).split())


def stream(
    fmt: ToolFormat, text: str, cuts: list[int], names: dict | None = None
) -> tuple[str, list[ToolCallDelta], list[ToolCall]]:
    parser = ToolParser(fmt, names)
    bounds = [0, *sorted(c % (len(text) + 1) for c in cuts), len(text)]
    content, deltas = [], []
    for a, b in zip(bounds, bounds[1:], strict=False):
        c, d = parser.push(text[a:b])
        content.append(c)
        deltas += d
    c, d = parser.finish()
    return "".join(content) + c, deltas + d, parser.calls


@pytest.mark.parametrize("name", sorted(FORMATS))
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), cuts=st.lists(st.integers(0, 10**6), max_size=12))
def test_any_split_gives_the_whole_text_result(
    name: str, data: st.DataObject, cuts: list[int]
) -> None:
    fmt = FORMATS[name]
    text, expected, content_chars = data.draw(replies(name))
    content, calls = parse_tool_calls(fmt, text)
    assert pairs(calls) == expected
    assert "".join(content.split()) == content_chars
    s_content, deltas, s_calls = stream(fmt, text, cuts)
    assert (s_content, pairs(s_calls)) == (content, pairs(calls))
    # Key/value calls open (id and name) at their name: one that breaks after that, e.g. text
    # spelling "<tool_call><function=add>" at the end, leaves deltas that never became a call.
    ids = {c.id for c in s_calls}
    streamed = [c for c in reassemble(deltas) if c[0] in ids]
    assert streamed == [(c.id, c.name, c.arguments) for c in s_calls]


# --- the grammar ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize(("choice", "parallel"), [(None, True), ("add", False)])
def test_random_walks_give_valid_calls(
    family: str, choice: str | None, parallel: bool, family_toks
) -> None:
    tok = family_toks[family]
    fmt, reasoning = detect_tool_format(tok), detect_reasoning(tok)
    assert fmt is not None
    lltok = ll_tokenizer(tok)
    grammar = tool_call_grammar(fmt, TOOLS, choice=choice, parallel=parallel, reasoning=reasoning)
    rng = np.random.default_rng(len(family))
    names = set()
    prefer = dict(reasoning.token_ids).get(reasoning.end) if reasoning else None
    for _ in range(10):
        text = tok.decode(random_walk(matcher(lltok, grammar), lltok, rng, prefer=prefer))
        _, content = split(reasoning, text)
        rest, calls = parse_tool_calls(fmt, content, tool_names=SCHEMAS)
        assert rest == "" and calls, text
        assert parallel or len(calls) == 1
        for call in calls:
            assert choice in (None, call.name)
            jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
            names.add(call.name)
    assert names == ({choice} if choice else set(SCHEMAS))


def test_grammar_writes_the_template_layout(family_toks) -> None:
    """What the Qwen3-Coder template writes for a call is a string of the grammar."""
    tok = family_toks["qwen3_coder"]
    fmt = detect_tool_format(tok)
    assert fmt is not None
    lltok = ll_tokenizer(tok)
    grammar = tool_call_grammar(fmt, TOOLS)
    call = qwen_call("get_weather", {"city": "Paris", "unit": "celsius", "days": "3"})
    for text, ok in [
        (call, True),
        (call.replace("Paris", "Paris</parameter>"), False),
        (call.replace("celsius", "kelvin"), False),
        (call.replace("<parameter=city>\nParis\n</parameter>\n", ""), False),  # required
        (call.replace("\n3\n", "\n30\n"), False),  # maximum 14
    ]:
        m = matcher(lltok, grammar)
        assert (
            m.consume_tokens(tok.encode(text, add_special_tokens=False)) and m.is_accepting()
        ) == ok


@pytest.mark.parametrize("family", ["qwen3_coder", "glm45"])
def test_raw_string_constraints_hold(family: str, family_toks) -> None:
    """Strings are written raw in these syntaxes, so their schema keywords become regexes."""
    tag = {
        "type": "object",
        "properties": {
            "code": {"type": "string", "pattern": "^[a-z]+$", "maxLength": 6},
            "label": {"type": "string", "pattern": "x/y", "maxLength": 7},
            "kind": {"const": "tag"},
        },
        "required": ["code", "label", "kind"],
    }
    tok = family_toks[family]
    fmt = detect_tool_format(tok)
    assert fmt is not None
    lltok = ll_tokenizer(tok)
    grammar = tool_call_grammar(fmt, [{"function": {"name": "tag", "parameters": tag}}])
    rng = np.random.default_rng(3)
    for _ in range(8):
        text = tok.decode(random_walk(matcher(lltok, grammar), lltok, rng))
        _, content = split(tok, text)
        rest, calls = parse_tool_calls(fmt, content, tool_names={"tag": tag})
        assert rest == "" and calls, text
        for call in calls:
            jsonschema.validate(json.loads(call.arguments), tag)
