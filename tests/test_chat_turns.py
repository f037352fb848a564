"""System messages after the conversation started (Claude Code sends one after the user turn):
kept where the template gives them a turn of their own (ChatML), folded into the neighbouring user
turn where it raises or misreads them (the Llama-2 template renders them as assistant replies)."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from fixtures import build_tokenizer
from mlxrun.chat_turns import fold_system, late_system
from mlxrun.tokenizer import load_tokenizer

pytestmark = pytest.mark.pure

CLAUDE_CODE = [
    {"role": "user", "content": "hi"},
    {"role": "system", "content": "Be brief."},
]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("turns")
    for kind in ("bpe", "spm"):  # ChatML + tools template; Llama-2 [INST] template
        build_tokenizer(root / kind, kind)
    return {kind: root / kind for kind in ("bpe", "spm")}


def test_chatml_renders_a_late_system_turn_where_it_stands(dirs):
    tok = load_tokenizer(dirs["bpe"])
    assert tok.render_chat(CLAUDE_CODE) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # Exactly what transformers renders: nothing was changed.
    ref = AutoTokenizer.from_pretrained(str(dirs["bpe"]))
    want = ref.apply_chat_template(CLAUDE_CODE, tokenize=False, add_generation_prompt=True)
    assert tok.render_chat(CLAUDE_CODE) == want


def test_llama2_folds_it_into_the_user_turn(dirs):
    tok, ref = load_tokenizer(dirs["spm"]), AutoTokenizer.from_pretrained(str(dirs["spm"]))
    # The template itself would make the system text an assistant reply (closed by </s>).
    raw = ref.apply_chat_template(CLAUDE_CODE, tokenize=False, add_generation_prompt=True)
    assert "Be brief. </s>" in raw
    folded = [{"role": "user", "content": "hi\n\nBe brief."}]
    assert (
        tok.render_chat(CLAUDE_CODE)
        == tok.render_chat(folded)
        == "<s>[INST] hi\n\nBe brief. [/INST]"
    )
    assert tok.apply_chat_template(CLAUDE_CODE) == tok.apply_chat_template(folded)


def test_a_template_that_raises_gets_the_folded_conversation(dirs):
    messages = [
        {"role": "system", "content": "S0"},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "system", "content": "S1"},
        {"role": "user", "content": "c"},
    ]
    ref = AutoTokenizer.from_pretrained(str(dirs["spm"]))
    with pytest.raises(Exception, match="alternate"):
        ref.apply_chat_template(messages, tokenize=False)
    text = load_tokenizer(dirs["spm"]).render_chat(messages)
    assert text == ("<s>[INST] <<SYS>>\nS0\n<</SYS>>\n\na [/INST] b </s><s>[INST] S1\n\nc [/INST]")


@pytest.mark.parametrize(
    "messages, want",
    [
        (CLAUDE_CODE, [{"role": "user", "content": "hi\n\nBe brief."}]),
        (  # leading system messages become one; a late one joins the next user turn
            [{"role": "system", "content": "A"}, {"role": "system", "content": "B"},
             {"role": "user", "content": "u"}, {"role": "assistant", "content": "x"},
             {"role": "system", "content": "S"}, {"role": "user", "content": "q"}],
            [{"role": "system", "content": "A\n\nB"}, {"role": "user", "content": "u"},
             {"role": "assistant", "content": "x"}, {"role": "user", "content": "S\n\nq"}],
        ),
        (  # no user turn beside it: a user turn of its own
            [{"role": "user", "content": "u"}, {"role": "assistant", "content": "x"},
             {"role": "system", "content": "S"}, {"role": "assistant", "content": "y"}],
            [{"role": "user", "content": "u"}, {"role": "assistant", "content": "x"},
             {"role": "user", "content": "S"}, {"role": "assistant", "content": "y"}],
        ),
    ],
)  # fmt: skip
def test_fold_system(messages, want):
    assert late_system(messages)
    assert fold_system(messages) == want
    assert not late_system(want)
