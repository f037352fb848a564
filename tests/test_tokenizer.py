"""Tokenizer layer: chat templates against transformers, eos ids, FIM tokens, streaming detokenizer.

The oracle is transformers itself: every rendering and every id list is compared with what
`AutoTokenizer.apply_chat_template` / `decode` produce for the same files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from fixtures import build_tokenizer
from mlxrun.errors import CorruptCheckpointError, InvalidRequestError, NotAModelError
from mlxrun.tokenizer import FALLBACK_STOP_STRINGS, FimTokens, Tokenizer, load_tokenizer

pytestmark = pytest.mark.pure

MULTIBYTE = "naïve café 😀👍🏽 你好世界 日本語 🇯🇵 ∑x²"

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Météo d'une ville — 天气",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]

ALTERNATING = {
    "user": [{"role": "user", "content": "Hello there"}],
    "system_user": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": MULTIBYTE},
    ],
    "multi_turn": [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "  4  "},
        {"role": "user", "content": "And 3+3?"},
    ],
}
TOOL_TURNS = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,  # as OpenAI clients send it; transformers drops None-valued keys
        "tool_calls": [
            {
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
            }
        ],
    },
    {"role": "tool", "content": '{"temp": 21, "sky": "☀"}'},
]


@pytest.fixture(scope="session")
def tok_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    dirs = {}
    for kind in ("bpe", "spm"):
        build_tokenizer(root / kind, kind)
        dirs[kind] = root / kind
    return dirs


@pytest.fixture(scope="session")
def toks(tok_dirs) -> dict[str, Tokenizer]:
    return {kind: load_tokenizer(path) for kind, path in tok_dirs.items()}


@pytest.fixture(scope="session")
def hf(tok_dirs) -> dict:
    return {kind: AutoTokenizer.from_pretrained(str(path)) for kind, path in tok_dirs.items()}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(path: Path, **changes) -> None:
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    cfg_path.write_text(json.dumps(cfg))


# --- chat templates ---------------------------------------------------------------------------


def _cases():
    for name, messages in ALTERNATING.items():
        for kind in ("bpe", "spm"):
            yield pytest.param(kind, messages, id=f"{kind}-{name}")
    yield pytest.param("bpe", TOOL_TURNS, id="bpe-tool_turns")


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("kind,messages", list(_cases()))
def test_chat_matches_transformers(toks, hf, kind, messages, add_generation_prompt):
    tok, ref = toks[kind], hf[kind]
    want_text = ref.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    want_ids = ref.apply_chat_template(
        messages, tokenize=True, return_dict=False, add_generation_prompt=add_generation_prompt
    )
    assert tok.render_chat(messages, add_generation_prompt=add_generation_prompt) == want_text
    ids = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert ids == list(want_ids)
    assert ids == tok.encode(want_text, add_special_tokens=False)


def test_generation_prompt_is_the_difference(toks):
    msgs = ALTERNATING["system_user"]
    with_prompt = toks["bpe"].render_chat(msgs)
    without = toks["bpe"].render_chat(msgs, add_generation_prompt=False)
    assert with_prompt == without + "<|im_start|>assistant\n"


def test_bos_written_once(toks):
    tok = toks["spm"]
    ids = tok.apply_chat_template(ALTERNATING["multi_turn"])
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
    assert ids.count(tok.bos_token_id) == 2  # one per [INST] turn, as the template writes


def test_tools_rendered_like_transformers(toks, hf):
    msgs = [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "Paris?"}]
    text = toks["bpe"].render_chat(msgs, tools=TOOLS)
    assert text == hf["bpe"].apply_chat_template(
        msgs, tools=TOOLS, tokenize=False, add_generation_prompt=True
    )
    assert "Météo d'une ville — 天气" in text  # tojson keeps non-ASCII as is
    assert '"name": "get_weather"' in text
    ids = toks["bpe"].apply_chat_template(msgs, tools=TOOLS)
    assert ids == list(
        hf["bpe"].apply_chat_template(
            msgs, tools=TOOLS, tokenize=True, return_dict=False, add_generation_prompt=True
        )
    )


def test_continue_final_message(toks, hf):
    msgs = [{"role": "user", "content": "Count:"}, {"role": "assistant", "content": "1, 2,"}]
    text = toks["bpe"].render_chat(msgs, continue_final_message=True)
    assert text.endswith("<|im_start|>assistant\n1, 2,")
    assert text == hf["bpe"].apply_chat_template(msgs, tokenize=False, continue_final_message=True)


def test_template_kwargs_reach_the_template(tmp_path, tok_dirs):
    path = _copy(tok_dirs["bpe"], tmp_path / "t")
    _edit_config(path, chat_template="{{ messages[0].content }}{% if flag %}!{% endif %}")
    tok = load_tokenizer(path)
    msgs = [{"role": "user", "content": "x"}]
    assert tok.render_chat(msgs, flag=True) == "x!"
    assert tok.render_chat(msgs) == "x"


def test_bad_role_order_is_invalid_request(toks):
    msgs = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(InvalidRequestError) as info:
        toks["spm"].render_chat(msgs)
    assert info.value.param == "messages"
    assert "alternate" in info.value.message
    with pytest.raises(InvalidRequestError):
        toks["spm"].apply_chat_template(msgs)


@pytest.mark.parametrize("messages", [[], [{"role": "user", "content": ["not", "a", "string"]}]])
def test_malformed_messages_are_invalid_request(toks, messages):
    with pytest.raises(InvalidRequestError) as info:
        toks["bpe"].apply_chat_template(messages)
    assert info.value.param == "messages"


def test_environment_features_match_transformers(tmp_path, tok_dirs):
    """loopcontrols, tojson (non-ASCII, indent), namespace, strftime_now, trim/lstrip blocks."""
    template = (
        "{%- set ns = namespace(n=0) %}\n"
        "{%- for m in messages %}\n"
        "  {%- if loop.index > 2 %}{% break %}{% endif %}\n"
        "  {%- set ns.n = ns.n + 1 %}\n"
        "{{ m | tojson(indent=1) }}\n"
        "{% endfor %}\n"
        "    {% if true %}\n"
        "n={{ ns.n }} year={{ strftime_now('%Y') | length }}\n"
        "    {% endif %}\n"
    )
    path = _copy(tok_dirs["bpe"], tmp_path / "t")
    _edit_config(path, chat_template=template)
    msgs = [{"role": "user", "content": c} for c in ("é", "😀", "skipped")]
    text = load_tokenizer(path).render_chat(msgs)
    assert text == AutoTokenizer.from_pretrained(str(path)).apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True
    )
    assert '"é"' in text and "skipped" not in text and "n=2 year=4" in text


def test_named_templates_pick_default_and_tool_use(tmp_path, tok_dirs):
    path = _copy(tok_dirs["bpe"], tmp_path / "t")
    named = [
        {"name": "default", "template": "D:{{ messages[0].content }}"},
        {"name": "tool_use", "template": "T:{{ tools[0].function.name }}"},
    ]
    _edit_config(path, chat_template=named)
    tok, ref = load_tokenizer(path), AutoTokenizer.from_pretrained(str(path))
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.chat_template == "D:{{ messages[0].content }}"
    assert tok.render_chat(msgs) == "D:hi" == ref.apply_chat_template(msgs, tokenize=False)
    assert tok.render_chat(msgs, tools=TOOLS) == "T:get_weather"
    assert tok.render_chat(msgs, tools=TOOLS) == ref.apply_chat_template(
        msgs, tools=TOOLS, tokenize=False
    )


def test_jinja_file_wins_like_transformers(tmp_path, tok_dirs):
    path = _copy(tok_dirs["bpe"], tmp_path / "t")
    (path / "chat_template.jinja").write_text("J:{{ messages[0].content }}")
    msgs = [{"role": "user", "content": "hi"}]
    want = AutoTokenizer.from_pretrained(str(path)).apply_chat_template(msgs, tokenize=False)
    assert load_tokenizer(path).render_chat(msgs) == want == "J:hi"


def test_chat_template_json(tmp_path, tok_dirs):
    path = _copy(tok_dirs["bpe"], tmp_path / "t")
    _edit_config(path, chat_template=None)
    (path / "chat_template.json").write_text(
        json.dumps({"chat_template": "P:{{ messages[0].content }}"})
    )
    tok = load_tokenizer(path)
    assert tok.has_chat_template
    assert tok.render_chat([{"role": "user", "content": "hi"}]) == "P:hi"


def test_fallback_without_template(tmp_path, tok_dirs):
    path = _copy(tok_dirs["bpe"], tmp_path / "t")
    _edit_config(path, chat_template=None)
    tok = load_tokenizer(path)
    assert not tok.has_chat_template and tok.chat_template is None
    assert tok.chat_stop_strings == FALLBACK_STOP_STRINGS
    msgs = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "you"}],
        },
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Again"},
    ]
    text = tok.render_chat(msgs)
    assert (
        text
        == "System: Be brief.\n\nUser: Hi you\n\nAssistant: Hello.\n\nUser: Again\n\nAssistant:"
    )
    assert tok.render_chat(msgs, add_generation_prompt=False).endswith("User: Again\n\n")
    assert tok.apply_chat_template(msgs) == tok.encode(text, add_special_tokens=False)
    assert tok.render_chat(msgs[1:2], tools=TOOLS).startswith('Tools:\n{"type": "function"')


def test_fallback_starts_with_bos_when_the_tokenizer_adds_one(tmp_path, tok_dirs):
    path = _copy(tok_dirs["spm"], tmp_path / "t")
    (path / "chat_template.jinja").unlink()
    tok = load_tokenizer(path)
    assert not tok.has_chat_template
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.decode(ids) == "<s>User: Hi\n\nAssistant:"


# --- vocabulary, eos, loading -----------------------------------------------------------------


def test_vocab_and_special_tokens(toks, hf):
    bpe = toks["bpe"]
    assert bpe.vocab_size == len(hf["bpe"]) == 1002
    im_end = bpe.encode("<|im_end|>", add_special_tokens=False)
    assert len(im_end) == 1 and bpe.is_special(im_end[0])
    assert bpe.id_to_token(im_end[0]) == "<|im_end|>"
    tool_call = bpe.encode("<tool_call>", add_special_tokens=False)
    assert len(tool_call) == 1 and not bpe.is_special(tool_call[0])
    assert bpe.bos_token_id == 0 and toks["spm"].bos_token_id == 1
    assert not bpe.is_special(bpe.encode("hello", add_special_tokens=False)[0])


@pytest.mark.parametrize("kind", ["bpe", "spm"])
def test_encode_decode_round_trip(toks, hf, kind):
    tok = toks[kind]
    text = f"def f(x):\n    return x  # {MULTIBYTE}"
    assert tok.encode(text) == hf[kind].encode(text)
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    ids = tok.encode(text)
    assert tok.decode(ids, skip_special_tokens=True) == hf[kind].decode(
        ids, skip_special_tokens=True
    )


def test_eos_ids_from_every_source(tmp_path, toks, tok_dirs):
    bpe = toks["bpe"]
    im_end = bpe.encode("<|im_end|>", add_special_tokens=False)[0]
    assert bpe.eos_token_ids == {0, im_end}  # tokenizer eos + the template's end-of-turn token
    assert toks["spm"].eos_token_ids == {2}

    path = _copy(tok_dirs["bpe"], tmp_path / "t")
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 7]}))
    (path / "config.json").write_text(json.dumps({"text_config": {"eos_token_id": 9}}))
    assert load_tokenizer(path, eos_token_ids=[11]).eos_token_ids == {0, im_end, 7, 9, 11}

    _edit_config(path, chat_template=None)  # <|im_end|> is in the vocab but no template uses it
    (path / "generation_config.json").unlink()
    assert load_tokenizer(path).eos_token_ids == {0, 9}


def test_load_errors(tmp_path, tok_dirs):
    with pytest.raises(NotAModelError):
        load_tokenizer(tmp_path)
    with pytest.raises(NotAModelError):
        load_tokenizer(tmp_path / "missing")
    path = _copy(tok_dirs["bpe"], tmp_path / "t")
    (path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CorruptCheckpointError):
        load_tokenizer(path)


# --- fill in the middle -----------------------------------------------------------------------

PREFIX, SUFFIX = "def add(a, b):\n    ", "\n    return c  # 完成"


def test_fim_qwen_style(toks, hf):
    tok = toks["bpe"]
    fim = tok.fim_tokens
    assert fim is not None and fim.style == "qwen"
    assert (fim.prefix, fim.suffix, fim.middle) == (
        "<|fim_prefix|>",
        "<|fim_suffix|>",
        "<|fim_middle|>",
    )
    assert (fim.prefix_id, fim.suffix_id, fim.middle_id) == (3, 4, 5)
    ids = tok.build_fim_prompt(PREFIX, SUFFIX)
    text = f"<|fim_prefix|>{PREFIX}<|fim_suffix|>{SUFFIX}<|fim_middle|>"
    assert ids == hf["bpe"].encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text


@pytest.fixture(scope="session")
def fim_tok(tok_dirs, tmp_path_factory):
    """A tokenizer built from the SentencePiece fixture plus the given FIM tokens."""
    cache: dict[tuple[str, ...], Tokenizer] = {}

    def make(tokens: tuple[str, ...]) -> Tokenizer:
        if tokens not in cache:
            ref = AutoTokenizer.from_pretrained(str(tok_dirs["spm"]))
            ref.add_tokens(list(tokens), special_tokens=True)
            out = tmp_path_factory.mktemp("fim")
            ref.save_pretrained(str(out))
            cache[tokens] = load_tokenizer(out)
        return cache[tokens]

    return make


FIM_STYLES = {
    "qwen": (
        "<|fim_prefix|>",
        "<|fim_suffix|>",
        "<|fim_middle|>",
        "<|fim_pad|>",
        "<|repo_name|>",
        "<|file_sep|>",
    ),
    "starcoder": (
        "<fim_prefix>",
        "<fim_suffix>",
        "<fim_middle>",
        "<fim_pad>",
        "<repo_name>",
        "<file_sep>",
    ),
    "deepseek": ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),
}


@pytest.mark.parametrize("style", list(FIM_STYLES))
def test_fim_styles_detected(fim_tok, style):
    tokens = FIM_STYLES[style]
    tok = fim_tok(tokens)
    fim = tok.fim_tokens
    assert isinstance(fim, FimTokens) and fim.style == style
    ids = {t: tok.encode(t, add_special_tokens=False)[0] for t in tokens}
    assert (fim.prefix, fim.suffix, fim.middle) == tokens[:3]
    assert (fim.prefix_id, fim.suffix_id, fim.middle_id) == tuple(ids[t] for t in tokens[:3])
    if len(tokens) > 3:
        assert (fim.pad, fim.repo_name, fim.file_sep) == tokens[3:]
        assert (fim.pad_id, fim.repo_name_id, fim.file_sep_id) == tuple(ids[t] for t in tokens[3:])
    assert fim.eot is None

    # [BOS] PRE prefix SUF suffix MID, the parts without SentencePiece's dummy-prefix space.
    prompt = tok.build_fim_prompt(PREFIX, SUFFIX)
    assert prompt[:2] == [tok.bos_token_id, fim.prefix_id] and prompt[-1] == fim.middle_id
    cut = prompt.index(fim.suffix_id)
    assert tok.decode(prompt[2:cut]) == PREFIX and tok.decode(prompt[cut + 1 : -1]) == SUFFIX
    want = "".join(tok.decode([i]) for i in (1, fim.prefix_id)) + PREFIX
    want += tok.decode([fim.suffix_id]) + SUFFIX + tok.decode([fim.middle_id])
    assert tok.decode(prompt) == want


def test_fim_codellama(fim_tok):
    tok = fim_tok(("▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>"))
    fim = tok.fim_tokens
    assert fim is not None and fim.style == "codellama"
    assert (fim.prefix, fim.suffix, fim.middle, fim.eot) == ("▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>")
    assert fim.eot_id in tok.eos_token_ids  # generation ends at <EOT>
    prompt = tok.build_fim_prompt(PREFIX, SUFFIX)
    assert prompt[:2] == [tok.bos_token_id, fim.prefix_id]
    assert tok.decode(prompt) == f"<s> <PRE> {PREFIX} <SUF>{SUFFIX} <MID>"


def test_no_fim_tokens(toks):
    assert toks["spm"].fim_tokens is None
    with pytest.raises(InvalidRequestError):
        toks["spm"].build_fim_prompt("a", "b")


# --- streaming detokenizer --------------------------------------------------------------------


def _stream(tok: Tokenizer, ids: list[int], skip: bool = False) -> tuple[list[str], str]:
    detok = tok.detokenizer(skip_special_tokens=skip)
    adds = [detok.add_token(i) for i in ids]
    return adds, detok.finalize()


def test_emoji_split_across_byte_level_tokens(toks):
    tok = toks["bpe"]
    ids = tok.encode("😀", add_special_tokens=False)
    assert len(ids) > 1  # a rare character: several byte-level tokens
    adds, rest = _stream(tok, ids)
    assert adds[:-1] == [""] * (len(ids) - 1) and adds[-1] == "😀" and rest == ""


def test_byte_fallback_run_and_leading_space(toks):
    tok = toks["spm"]
    ids = tok.encode("Hello 🦜 world", add_special_tokens=False)
    pieces = [tok.id_to_token(i) for i in ids]
    assert "<0xF0>" in pieces  # the parrot is not in the vocab: four byte-fallback tokens
    adds, rest = _stream(tok, ids)
    assert pieces[0].startswith("▁") and adds[0] == "Hello"[: len(adds[0])]  # no leading space
    assert "".join(adds) + rest == "Hello 🦜 world" == tok.decode(ids)
    assert not any("\ufffd" in a for a in adds)


def test_window_stays_small(toks):
    tok = toks["bpe"]
    ids = tok.encode(MULTIBYTE * 40, add_special_tokens=False)
    detok = tok.detokenizer()
    widest = 0
    for i in ids:
        detok.add_token(i)
        widest = max(widest, len(detok._window))
    assert len(ids) > 500 and widest <= 8


def _interesting_ids(tok: Tokenizer) -> list[int]:
    ids = set(tok.encode(MULTIBYTE + " <tool_call> Hello world", add_special_tokens=False))
    ids |= {i for i in range(tok.vocab_size) if tok.is_special(i)}
    ids |= {i for i in range(tok.vocab_size) if (tok.id_to_token(i) or "").startswith("<0x")}
    ids.add(tok.vocab_size + 5)  # beyond the tokenizer: a padded embedding row decodes to nothing
    return sorted(ids)


@pytest.mark.parametrize("kind", ["bpe", "spm"])
@pytest.mark.parametrize("skip", [False, True])
def test_detokenizer_exact_for_any_ids(toks, kind, skip):
    tok = toks[kind]
    token = st.one_of(st.integers(0, tok.vocab_size - 1), st.sampled_from(_interesting_ids(tok)))

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(token, max_size=40))
    def check(ids):
        adds, rest = _stream(tok, ids, skip)
        assert "".join(adds) + rest == tok.decode(ids, skip_special_tokens=skip)

    check()


@pytest.mark.parametrize("kind", ["bpe", "spm"])
def test_detokenizer_exact_for_encoded_text(toks, kind):
    tok = toks[kind]
    alphabet = st.sampled_from(
        list(MULTIBYTE + " \n\tabcdefxyz.,'") + ["🦜", "龘", "<|im_end|>", "<s>"]
    )

    @settings(max_examples=200, deadline=None)
    @given(st.lists(alphabet, max_size=30).map("".join), st.booleans())
    def check(text, specials):
        ids = tok.encode(text, add_special_tokens=specials)
        adds, rest = _stream(tok, ids)
        assert "".join(adds) + rest == tok.decode(ids)
        assert "".join(a for a in adds if a).count("\ufffd") == 0  # valid text never shows U+FFFD

    check()
