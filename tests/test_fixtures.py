"""The fixture checkpoints are sane: right layout, loadable, and transformers == mlx-lm."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx_lm.utils import load as mlx_load
from mlx_lm.utils import load_tokenizer as mlx_load_tokenizer
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from fixtures import ARCHS, build_checkpoint, build_tokenizer, tokenizer_spec
from fixtures.corpus import ROUND_TRIP_SAMPLES

PROMPT = "def fibonacci(n):\n    return [0, 1] # 😀 你好"
TIED = {"qwen2", "gemma2"}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


def _weight_files(path: Path) -> list[str]:
    return sorted(p.name for p in path.glob("*.safetensors"))


def _file_dtypes(path: Path) -> set[torch.dtype]:
    dtypes = set()
    for name in _weight_files(path):
        with safe_open(str(path / name), "pt") as f:
            dtypes |= {f.get_tensor(k).dtype for k in f.keys()}
    return dtypes


@pytest.mark.model
@pytest.mark.parametrize("arch", ARCHS)
def test_checkpoint_layout(checkpoint_factory, arch):
    path = checkpoint_factory(arch)
    assert _weight_files(path) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(_weight_files(path))
    names = set()
    for name in _weight_files(path):
        with safe_open(str(path / name), "pt") as f:
            names |= set(f.keys())
    assert names == set(index["weight_map"])
    assert ("lm_head.weight" in names) == (arch not in TIED)

    config = json.loads((path / "config.json").read_text())
    spec = tokenizer_spec("bpe")
    assert config["model_type"] == arch
    assert len(config["architectures"]) == 1 and config["architectures"][0].endswith("ForCausalLM")
    assert config["dtype"] == "float32"  # as transformers 5 save_pretrained writes it
    assert config["max_position_embeddings"] == 2048
    assert config["vocab_size"] % 64 == 0 and 0 <= config["vocab_size"] - spec.size < 64
    assert (config["bos_token_id"], config["eos_token_id"]) == (
        spec.bos_token_id,
        spec.eos_token_id,
    )
    assert config["tie_word_embeddings"] == (arch in TIED)
    assert isinstance(config["rope_parameters"]["rope_theta"], float)
    assert "rope_theta" not in config and "torch_dtype" not in config  # nothing patched back
    gen = json.loads((path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == list(spec.stop_token_ids)


@pytest.mark.model
@pytest.mark.parametrize("arch", ARCHS)
def test_transformers4_layout(checkpoint_factory, arch):
    """The 4.x layout: top-level rope_theta and torch_dtype, 4.x key names, no rope_parameters."""
    v5 = json.loads((checkpoint_factory(arch) / "config.json").read_text())
    path = checkpoint_factory(arch, config_format="transformers4")
    config = json.loads((path / "config.json").read_text())
    assert "rope_parameters" not in config and "dtype" not in config
    assert config["torch_dtype"] == "float32"
    assert config["rope_theta"] == v5["rope_parameters"]["rope_theta"]
    assert ("num_experts" in config) == (arch == "qwen3_moe")


@pytest.mark.model
@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_and_mlx_lm_agree(checkpoint_factory, arch):
    """Plain mlx-lm reads the 4.x layout right (the 5.x one needs mlxrun's normalizer)."""
    path = checkpoint_factory(arch, config_format="transformers4")
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer.encode(PROMPT)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()  # (L, vocab)
    assert np.isfinite(expected).all()
    assert 0.05 < expected.std() < 5.0  # neither flat nor exploding

    mlx_model, mlx_tokenizer = mlx_load(str(path))
    assert mlx_tokenizer.encode(PROMPT) == ids
    actual = np.array(mlx_model(mx.array([ids]))[0])
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=0)


@pytest.mark.model
@pytest.mark.parametrize(
    ("arch", "num_shards", "dtype"),
    [("llama", 1, "bfloat16"), ("mixtral", 3, "float16"), ("qwen2", 5, "bfloat16")],
)
def test_shards_and_dtypes(checkpoint_factory, arch, num_shards, dtype):
    path = checkpoint_factory(arch, num_shards=num_shards, dtype=dtype)
    files = _weight_files(path)
    if num_shards == 1:
        assert files == ["model.safetensors"]
        assert not (path / "model.safetensors.index.json").exists()
    else:
        assert files == [
            f"model-{i:05d}-of-{num_shards:05d}.safetensors" for i in range(1, num_shards + 1)
        ]
    assert _file_dtypes(path) == {getattr(torch, dtype)}
    config = json.loads((path / "config.json").read_text())
    assert config["dtype"] == dtype
    mlx_model, _ = mlx_load(str(path))
    assert mlx_model.model.embed_tokens.weight.dtype == getattr(mx, dtype)


@pytest.mark.model
def test_spm_checkpoint_loads_everywhere(checkpoint_factory):
    path = checkpoint_factory("mistral", tokenizer="spm")
    assert not (path / "tokenizer.json").exists()
    config = json.loads((path / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer.encode("Hello world")
    assert ids[0] == 1  # add_bos_token
    model, mlx_tokenizer = mlx_load(str(path))
    assert mlx_tokenizer.encode("Hello world") == ids
    assert mlx_tokenizer.eos_token_ids == {2}
    assert np.isfinite(np.array(model(mx.array([ids])))).all()


@pytest.mark.model
def test_builds_are_deterministic(tmp_path):
    def digest(path: Path) -> str:
        h = hashlib.sha256()
        for p in sorted(path.iterdir()):
            h.update(p.name.encode() + p.read_bytes())
        return h.hexdigest()

    first = build_checkpoint(tmp_path / "a", "qwen3_moe", num_shards=1)
    again = build_checkpoint(tmp_path / "b", "qwen3_moe", num_shards=1)
    other = build_checkpoint(tmp_path / "c", "qwen3_moe", num_shards=1, seed=1)
    assert digest(first) == digest(again) != digest(other)


@pytest.mark.model
def test_build_refuses_bad_requests(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(FileExistsError):
        build_checkpoint(tmp_path / "full")
    with pytest.raises(ValueError, match="tokenizer='bpe'"):
        build_checkpoint(tmp_path / "q", "qwen2", tokenizer="spm")
    with pytest.raises(ValueError, match="unknown arch"):
        build_checkpoint(tmp_path / "z", "gpt9")
    assert sorted(os.listdir(tmp_path)) == ["full"]  # nothing half-written left behind
    assert (tmp_path / "full" / "x").read_text() == "keep me"


@pytest.fixture(scope="module", params=["bpe", "spm"])
def tokenizer_dir(request, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp(f"tok-{request.param}")
    build_tokenizer(path, request.param)
    return path


@pytest.mark.pure
def test_tokenizer_files(tokenizer_dir):
    names = {p.name for p in tokenizer_dir.iterdir()}
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    if "tokenizer.model" in names:  # spm: template in its own file (newer Hub layout)
        assert names == {
            "tokenizer.model",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "chat_template.jinja",
        }
        assert config["tokenizer_class"] == "LlamaTokenizer" and "chat_template" not in config
    else:
        assert names == {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
        assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["chat_template"]


@pytest.mark.pure
def test_tokenizer_round_trips(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    wrapper = mlx_load_tokenizer(tokenizer_dir)
    spm = (tokenizer_dir / "tokenizer.model").exists()
    for text in ROUND_TRIP_SAMPLES:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert wrapper.encode(text, add_special_tokens=False) == ids
        leading_space = text[0].isspace()
        # transformers' Metaspace emulation drops one leading space on decode, as it does for
        # real Llama tokenizers: upstream behaviour, not a fixture bug.
        expected = text[1:] if spm and leading_space else text
        assert tokenizer.decode(ids) == expected
        assert wrapper.decode(ids) == expected
        if leading_space:
            continue  # mlx-lm's streaming detokenizers strip a leading space by design
        detok = wrapper.detokenizer
        detok.reset()
        for token in ids:
            detok.add_token(token)
        detok.finalize()
        assert detok.text == text


@pytest.mark.pure
def test_spm_matches_sentencepiece():
    import sentencepiece

    files = dict(tokenizer_spec("spm").files)
    sp = sentencepiece.SentencePieceProcessor(model_proto=files["tokenizer.model"])
    assert sp.get_piece_size() == tokenizer_spec("spm").size
    assert (
        sp.id_to_piece(0) == "<unk>" and sp.id_to_piece(1) == "<s>" and sp.id_to_piece(2) == "</s>"
    )
    assert sp.decode(sp.encode("😀 你好 \x07")) == "😀 你好 \x07"  # byte fallback


@pytest.mark.pure
def test_bpe_special_tokens_are_single_ids(tmp_path):
    build_tokenizer(tmp_path, "bpe")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    for token in (
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|fim_prefix|>",
        "<|fim_suffix|>",
        "<|fim_middle|>",
        "<tool_call>",
        "</tool_call>",
    ):
        ids = tokenizer.encode(f"a{token}b", add_special_tokens=False)
        assert tokenizer.convert_ids_to_tokens(ids[1]) == token and len(ids) == 3
    assert tokenizer.eos_token == "<|endoftext|>"


@pytest.mark.pure
def test_chatml_template(tmp_path):
    build_tokenizer(tmp_path, "bpe")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi 😀"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi 😀<|im_end|>\n<|im_start|>assistant\n"
    )
    no_prompt = tokenizer.apply_chat_template(messages, tokenize=False)
    assert not no_prompt.endswith("<|im_start|>assistant\n")

    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
    turns = messages + [
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "sunny"},
    ]
    text = tokenizer.apply_chat_template(turns, tools=TOOLS, tokenize=False)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert json.dumps(TOOLS[0]) in text
    assert (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>' in text
    )
    assert "<tool_response>\nsunny\n</tool_response>" in text
    assert mlx_load_tokenizer(tmp_path).has_tool_calling  # mlx-lm recognises the template


@pytest.mark.pure
def test_llama2_template(tmp_path):
    build_tokenizer(tmp_path, "spm")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "你好"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] 你好 [/INST]"
    )
    assert mlx_load_tokenizer(tmp_path).chat_template == tokenizer.chat_template


@pytest.mark.pure
def test_environment_is_hermetic():
    import huggingface_hub.constants

    assert huggingface_hub.constants.HF_HUB_OFFLINE  # set before huggingface_hub was imported
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert os.environ["HF_HUB_DISABLE_TELEMETRY"] == "1"
    home = Path(os.environ["MLXRUN_HOME"])
    assert home.is_dir() and not any(home.iterdir())
    assert not home.resolve().is_relative_to(Path.home().resolve() / ".mlxrun")
