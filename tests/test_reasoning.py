"""Reasoning: detecting <think> models and splitting their reasoning out of the text, streaming."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from mlxrun.parsing.reasoning import ReasoningFormat, ReasoningParser, detect_reasoning
from mlxrun.tokenizer import Tokenizer, load_tokenizer

WS = " \t\r\n"
# Qwen3-style: the template writes <think> blocks of past turns; with thinking off it closes an
# empty block in the generation prompt.
THINK_TEMPLATE = """\
{%- for message in messages %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}
{{- '<think>\\n\\n</think>\\n\\n' }}
{%- elif open_think is defined %}{{- '<think>\\n' }}
{%- endif %}
{%- endif %}
"""


@pytest.fixture(scope="module")
def bpe_path(checkpoint_factory: Callable[..., Path]) -> Path:
    return checkpoint_factory("llama", tokenizer="bpe")


def with_template(path: Path, template: str, added: tuple[str, ...] = ()) -> Tokenizer:
    backend = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    backend.chat_template = template
    backend.add_tokens(list(added), special_tokens=False)
    return Tokenizer(backend, path)


def test_detection(bpe_path: Path) -> None:
    assert detect_reasoning(load_tokenizer(bpe_path)) is None  # ChatML + tools, no <think>
    by_vocab = with_template(bpe_path, "{{ messages[0].content }}", ("<think>", "</think>"))
    vocab = by_vocab.backend.get_vocab()
    ids = (("<think>", vocab["<think>"]), ("</think>", vocab["</think>"]))
    assert detect_reasoning(by_vocab) == ReasoningFormat("<think>", "</think>", False, ids)
    tok = with_template(bpe_path, THINK_TEMPLATE)  # markers only in the template
    msgs = [{"role": "user", "content": "Hi"}]
    assert detect_reasoning(tok, tok.render_chat(msgs)) == ReasoningFormat(starts_open=False)
    opened = tok.render_chat(msgs, open_think=True)
    assert opened.endswith("<think>\n")
    assert detect_reasoning(tok, opened) == ReasoningFormat(starts_open=True)
    closed = tok.render_chat(msgs, enable_thinking=False)
    assert detect_reasoning(tok, closed) == ReasoningFormat(starts_open=False)


def split(fmt: ReasoningFormat, chunks: list[str]) -> tuple[str, str]:
    parser = ReasoningParser(fmt)
    reasoning, content = [], []
    for chunk in chunks:
        r, c = parser.push(chunk)
        reasoning.append(r)
        content.append(c)
    r, c = parser.finish()
    return "".join(reasoning) + r, "".join(content) + c


CLOSED, OPEN = ReasoningFormat(), ReasoningFormat(starts_open=True)


@pytest.mark.parametrize(
    ("fmt", "text", "expected"),
    [
        (CLOSED, "<think>\nLet me see.\n</think>\n\nIt is 4.", ("Let me see.", "It is 4.")),
        (CLOSED, "\n <think>a</think>b", ("a", "b")),
        (CLOSED, "It is 4.", ("", "It is 4.")),
        (CLOSED, "  It is <think>4</think>", ("", "  It is <think>4</think>")),
        (CLOSED, "<thi", ("", "<thi")),
        (CLOSED, "<think>never closed </thi", ("never closed </thi", "")),
        (CLOSED, "<think></think>", ("", "")),
        (CLOSED, "<think>a</think>b<think>c</think>", ("a", "b<think>c</think>")),
        (OPEN, "\nplan\n</think>\n\nanswer", ("plan", "answer")),
        (OPEN, "no end yet", ("no end yet", "")),
        (OPEN, "</think>x", ("", "x")),
    ],
)
def test_examples(fmt: ReasoningFormat, text: str, expected: tuple[str, str]) -> None:
    assert split(fmt, [text]) == expected
    assert split(fmt, list(text)) == expected


def test_reasoning_streams_and_holds_only_marker_prefixes() -> None:
    parser = ReasoningParser(CLOSED)
    assert parser.push("<thi") == ("", "")
    assert parser.push("nk>\nStep one") == ("Step one", "")
    assert parser.in_reasoning
    assert parser.push(", two </th") == (", two", "")  # " </th" may still be the end marker
    assert parser.push("e end") == (" </the end", "")
    assert parser.push("</think>\n\nDone") == ("", "Done")
    assert not parser.in_reasoning
    assert parser.finish() == ("", "")


PIECES = st.sampled_from(
    ["<think>", "</think>", "<th", "</thi", "<", ">", "/", " ", "\n", "a", "é"]
)
TEXT = st.lists(PIECES | st.text("ab <>/\n", max_size=3), max_size=10).map("".join)


def cut(text: str, cuts: list[int]) -> list[str]:
    bounds = [0, *sorted(c % (len(text) + 1) for c in cuts), len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


@settings(max_examples=300, deadline=None)
@given(
    lead=st.text(WS, max_size=2),
    reasoning=TEXT.filter(lambda t: "</think>" not in t),
    content=TEXT,
    opened=st.booleans(),
    cuts=st.lists(st.integers(0, 10**4), max_size=10),
)
def test_any_split_gives_the_same_parts(
    lead: str, reasoning: str, content: str, opened: bool, cuts: list[int]
) -> None:
    fmt = ReasoningFormat(starts_open=opened)
    text = lead + ("" if opened else "<think>") + reasoning + "</think>" + content
    expected = (reasoning.strip(WS), content.lstrip(WS))
    assert split(fmt, [text]) == expected
    assert split(fmt, cut(text, cuts)) == expected


@settings(max_examples=300, deadline=None)
@given(text=TEXT, opened=st.booleans(), cuts=st.lists(st.integers(0, 10**4), max_size=10))
def test_arbitrary_text_splits_consistently(text: str, opened: bool, cuts: list[int]) -> None:
    fmt = ReasoningFormat(starts_open=opened)
    whole = split(fmt, [text])
    assert split(fmt, cut(text, cuts)) == whole
    if not opened and not text.lstrip(WS).startswith("<think>"):
        assert whole == ("", text)  # no block: the text is content, untouched
