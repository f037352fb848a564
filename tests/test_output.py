"""Output stage: stop strings across chunk boundaries, and TextOutput over a real tokenizer."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fixtures import build_tokenizer
from mlxrun.output import StopMatcher, TextOutput
from mlxrun.tokenizer import load_tokenizer

pytestmark = pytest.mark.pure


def _run(stops, chunks) -> tuple[str, bool, str | None]:
    m = StopMatcher(stops)
    out = []
    stopped = False
    for chunk in chunks:
        emit, stopped = m.feed(chunk)
        out.append(emit)
        if stopped:
            break
    out.append(m.flush())
    return "".join(out), m.stopped, m.matched


def _reference(stops, text) -> tuple[str, bool]:
    hits = [text.find(s) for s in stops if s and s in text]
    return (text[: min(hits)], True) if hits else (text, False)


def test_stop_split_across_chunks():
    m = StopMatcher(["\n\nUser:"])
    assert m.feed("Sure.\n\nUs") == ("Sure.", False)  # "\n\nUs" might start the stop: held
    assert m.feed("er: next") == ("", True)
    assert m.matched == "\n\nUser:" and m.stopped
    assert m.feed("more") == ("", True) and m.flush() == ""


def test_held_text_released_when_it_diverges():
    m = StopMatcher(["\n\nUser:"])
    assert m.feed("a\n\nU") == ("a", False)
    assert m.feed("nder") == ("\n\nUnder", False)
    assert m.feed("\n") == ("", False)
    assert m.flush() == "\n"  # end of stream: the partial match was not a stop
    assert not m.stopped and m.matched is None


def test_no_stops_no_holdback():
    m = StopMatcher([])
    assert m.feed("abc\n\nUser:") == ("abc\n\nUser:", False)
    assert m.flush() == ""
    assert StopMatcher(["", ""]).feed("x") == ("x", False)  # empty strings are ignored


def test_several_stops_earliest_start_wins():
    assert _run(["world", "o w"], ["hello world"]) == ("hell", True, "o w")
    assert _run(["END", "STOP"], ["a", "bSTO", "P c END"]) == ("ab", True, "STOP")
    # "bc" completes first, but "abcd" starts earlier and may still complete: wait and see.
    assert _run(["abcd", "bc"], ["a", "b", "c", "d"]) == ("", True, "abcd")
    assert _run(["abcd", "bc"], ["a", "b", "c", "x"]) == ("a", True, "bc")
    assert _run(["abcd", "bc"], ["a", "b", "c"]) == ("a", True, "bc")  # decided at flush


def test_overlapping_prefixes():
    assert _run(["aab"], ["a", "a", "a", "b"]) == ("a", True, "aab")
    assert _run(["abab", "b!"], ["ab", "ab"]) == ("", True, "abab")
    assert _run(["abab", "b!"], ["aba", "b!"]) == ("", True, "abab")  # earliest start
    assert _run(["abab", "b!"], ["ab", "b!"]) == ("ab", True, "b!")


def test_stop_at_start_and_end():
    assert _run(["x"], ["xyz"]) == ("", True, "x")
    assert _run(["yz"], ["x", "y", "z"]) == ("x", True, "yz")


small_text = st.text(alphabet="ab\n:U", max_size=40)
stop_lists = st.lists(st.text(alphabet="ab\n:U", min_size=1, max_size=4), max_size=3)


@settings(max_examples=400, deadline=None)
@given(small_text, stop_lists, st.lists(st.integers(0, 40), max_size=8))
def test_chunking_never_changes_the_result(text, stops, cuts):
    bounds = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    chunks = [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    got, stopped, _ = _run(stops, chunks)
    assert (got, stopped) == _reference(stops, text)
    assert (got, stopped) == _run(stops, list(text))[:2]  # one character at a time


# --- TextOutput over a real tokenizer -----------------------------------------------------------


@pytest.fixture(scope="module", params=["bpe", "spm"])
def tok(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    build_tokenizer(path, request.param)
    return load_tokenizer(path)


def _generate(out: TextOutput, ids) -> str:
    parts = []
    for i in ids:
        delta, stopped = out.push(i)
        parts.append(delta)
        if stopped:
            break
    parts.append(out.finish())
    return "".join(parts)


def test_text_output_stops_across_tokens(tok):
    ids = tok.encode("Hello there 😀\n\nUser: and more", add_special_tokens=False)
    out = TextOutput(tok, ["\n\nUser:"])
    assert _generate(out, ids) == "Hello there 😀"
    assert out.stopped and out.matched_stop == "\n\nUser:"
    assert out.text == "Hello there 😀"
    assert out.push(ids[0]) == ("", True) and out.finish() == ""


def test_text_output_without_stops_is_the_decoded_text(tok):
    ids = tok.encode("naïve 你好 🦜 code = x  ", add_special_tokens=False)
    out = TextOutput(tok)
    assert _generate(out, ids) == tok.decode(ids) and not out.stopped
    assert out.finish() == ""  # idempotent


def test_eos_and_special_tokens_are_not_text(tok):
    eos = min(tok.eos_token_ids)
    ids = tok.encode("Hi", add_special_tokens=False)
    out = TextOutput(tok)
    assert out.push(eos) == ("", False)
    specials = [i for i in range(tok.vocab_size) if tok.is_special(i)]
    text = _generate(out, specials + ids)
    assert text == tok.decode(ids)
    shown = [i for i in specials if i not in tok.eos_token_ids]
    kept = TextOutput(tok, skip_special_tokens=False)
    assert _generate(kept, shown + ids) == tok.decode(shown + ids) != tok.decode(ids)


def test_added_tool_tokens_are_kept(tmp_path):
    build_tokenizer(tmp_path, "bpe")  # <tool_call> is an added, non-special token (as in Qwen2.5)
    tok = load_tokenizer(tmp_path)
    text = '<tool_call>\n{"name": "f"}\n</tool_call>'
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.id_to_token(ids[0]) == "<tool_call>"
    assert _generate(TextOutput(tok), ids) == text


def test_push_many(tok):
    ids = tok.encode("one two END", add_special_tokens=False)
    out = TextOutput(tok, ["END", "two"])
    delta, stopped = out.push_many(ids)
    assert stopped and delta == "one " and out.matched_stop == "two"


def test_stop_completed_by_held_text_at_finish(tok):
    # The parrot's bytes are held until the sequence ends (spm: a byte-fallback run at the end).
    out = TextOutput(tok, ["🦜"])
    for i in tok.encode("ab 🦜", add_special_tokens=False):
        assert not out.push(i)[1] or out.stopped
    out.finish()
    assert out.stopped and out.text == "ab "


@settings(max_examples=120, deadline=None)
@given(data=st.data())
def test_text_output_matches_decode_then_cut(tok, data):
    alphabet = st.sampled_from(list("ab \n:Us😀你好") + ["🦜", "User:"])
    text = data.draw(st.lists(alphabet, max_size=25).map("".join))
    ids = tok.encode(text, add_special_tokens=False)
    full = tok.decode(ids, skip_special_tokens=True)
    stops = data.draw(
        st.lists(st.sampled_from(["\n\nUser:", "好", "b a", "😀🦜", "zz"]), max_size=3)
    )
    got = _generate(TextOutput(tok, stops), ids)
    assert got == _reference(stops, full)[0]
