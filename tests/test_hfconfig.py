"""hfconfig on hand-written config dicts in the shapes transformers 4.x and 5.x write (pure, fast)."""

from __future__ import annotations

import copy

import pytest

from mlxrun.errors import UnsupportedModelError
from mlxrun.hfconfig import normalize, to_legacy, unhonoured_window

pytestmark = pytest.mark.pure

BASE = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "rms_norm_eps": 1e-6,
    "vocab_size": 1024,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}


def v5(model_type: str, rope: dict | None = None, **extra) -> dict:
    """What transformers 5 save_pretrained writes: rope_parameters and dtype."""
    params = {"rope_theta": 500000.0, "rope_type": "default", **(rope or {})}
    return {**BASE, "model_type": model_type, "dtype": "bfloat16", "rope_parameters": params,
            **extra}  # fmt: skip


def v4(model_type: str, **extra) -> dict:
    """What transformers 4.x wrote: top-level rope_theta / rope_scaling and torch_dtype."""
    return {**BASE, "model_type": model_type, "torch_dtype": "bfloat16", "rope_theta": 500000.0,
            "rope_scaling": None, **extra}  # fmt: skip


def test_v5_default_rope_fills_theta_and_torch_dtype():
    out = normalize(v5("llama"))
    assert out["rope_theta"] == 500000.0
    assert out["torch_dtype"] == "bfloat16"
    assert out.get("rope_scaling") is None
    assert out["rope_parameters"] == {"rope_theta": 500000.0, "rope_type": "default"}  # kept


def test_input_is_not_modified():
    config = v5("llama", {"rope_type": "linear", "factor": 2.0})
    before = copy.deepcopy(config)
    normalize(config)
    assert config == before


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral", "phi3", "gemma2", "mixtral"])
def test_legacy_configs_pass_through_unchanged(model_type):
    config = v4(model_type)
    assert normalize(config) == config


def test_legacy_llama3_scaling_unchanged_but_for_type_alias():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # fmt: skip
    out = normalize(v4("llama", rope_scaling=scaling))
    assert out["rope_scaling"] == {**scaling, "type": "llama3"}


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "factor": 4.0},
        {"rope_type": "dynamic", "factor": 2.0},
        {
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 512,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
        },  # fmt: skip
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },  # fmt: skip
    ],
)
def test_v5_scaling_becomes_rope_scaling(rope):
    out = normalize(v5("llama", rope))
    assert out["rope_theta"] == 500000.0
    expected = {**rope, "type": rope["rope_type"]}
    assert out["rope_scaling"] == expected  # theta stays outside, as 4.x wrote it


def test_yarn_without_pretraining_length_takes_max_position_embeddings():
    # transformers defaults it to max_position_embeddings; mlx-lm's YarnRoPE would assume 4096.
    out = normalize(v5("qwen2", {"rope_type": "yarn", "factor": 4.0}))
    assert out["rope_scaling"]["original_max_position_embeddings"] == 2048


def test_phi3_longrope_and_partial_rotary_factor():
    rope = {"rope_type": "longrope", "short_factor": [1.0] * 16, "long_factor": [2.0] * 16,
            "original_max_position_embeddings": 512, "partial_rotary_factor": 0.5}  # fmt: skip
    out = normalize(v5("phi3", rope, original_max_position_embeddings=512))
    assert out["partial_rotary_factor"] == 0.5
    assert out["rope_scaling"]["type"] == "longrope"  # phi3 reads "type" only
    assert "partial_rotary_factor" not in out["rope_scaling"]


def test_renamed_expert_count():
    out = normalize(v5("qwen3_moe", num_local_experts=8, num_experts_per_tok=2,
                       moe_intermediate_size=64, head_dim=32, decoder_sparse_step=1,
                       mlp_only_layers=[], norm_topk_prob=True))  # fmt: skip
    assert out["num_experts"] == 8
    assert out["rope_theta"] == 500000.0  # a required field of mlx-lm's qwen3_moe


def test_per_layer_type_rope_equal_dicts_collapse():
    same = {"rope_type": "default", "rope_theta": 10000.0}
    config = {**v5("llama"), "rope_parameters": {"full_attention": same, "sliding_attention": same}}
    assert normalize(config)["rope_theta"] == 10000.0


def test_per_layer_type_rope_maps_to_local_base_freq_where_the_class_has_one():
    config = {**v5("gemma3_text"), "rope_parameters": {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
    }}  # fmt: skip
    out = normalize(config)
    assert (out["rope_theta"], out["rope_local_base_freq"]) == (1e6, 1e4)
    assert out["rope_scaling"] == {"rope_type": "linear", "factor": 8.0, "type": "linear"}


def test_per_layer_type_rope_the_class_cannot_split_is_refused():
    config = {**v5("llama"), "rope_parameters": {
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
    }}  # fmt: skip
    with pytest.raises(UnsupportedModelError, match="per layer type"):
        normalize(config)


@pytest.mark.parametrize(
    "model_type,rope",
    [
        ("mixtral", {"rope_type": "linear", "factor": 2.0}),
        ("qwen3_moe", {"rope_type": "yarn", "factor": 4.0}),
        ("gemma2", {"rope_type": "linear", "factor": 2.0}),
        ("phi3", {"rope_type": "dynamic", "factor": 2.0}),
    ],
)
def test_scaling_the_class_ignores_is_refused(model_type, rope):
    with pytest.raises(UnsupportedModelError, match=repr(rope["rope_type"])):
        normalize(v5(model_type, rope))


def test_legacy_scaling_the_class_ignores_is_refused_too():
    with pytest.raises(UnsupportedModelError, match="'yarn'"):
        normalize(v4("mixtral", rope_scaling={"type": "yarn", "factor": 4.0}))


@pytest.mark.parametrize(
    "rope,key",
    [
        ({"rope_type": "yarn", "factor": 4.0, "attention_factor": 0.8}, "attention_factor"),
        ({"rope_type": "yarn", "factor": 4.0, "truncate": False}, "truncate"),
    ],
)
def test_scaling_keys_mlx_lm_never_reads_are_refused(rope, key):
    with pytest.raises(UnsupportedModelError, match=key):
        normalize(v5("llama", rope))


def test_partial_rotary_factor_the_class_lacks_is_refused():
    with pytest.raises(UnsupportedModelError, match="partial_rotary_factor"):
        normalize(v5("llama", {"partial_rotary_factor": 0.5}))


def test_unknown_rope_type_is_refused():
    with pytest.raises(UnsupportedModelError, match="'nope'"):
        normalize(v5("llama", {"rope_type": "nope", "factor": 2.0}))


def test_text_config_is_normalized_too():
    config = {"model_type": "x", "text_config": v5("llama")}
    assert to_legacy(config)["text_config"]["rope_theta"] == 500000.0


@pytest.mark.parametrize(
    "config,window",
    [
        # gemma2 (5.x writes layer_types): mlx-lm's gemma2 attends to everything.
        (
            {
                "model_type": "gemma2",
                "sliding_window": 4096,
                "layer_types": ["sliding_attention", "full_attention"],
            },
            4096,
        ),  # fmt: skip
        ({"model_type": "gemma2", "sliding_window": 4096}, 4096),  # 4.x: no layer_types
        ({"model_type": "mistral", "sliding_window": 4096}, 4096),  # Mistral 7B v0.1
        ({"model_type": "mistral", "sliding_window": None}, None),
        # Qwen2 stores a window but switches it off.
        ({"model_type": "qwen2", "sliding_window": 32768, "use_sliding_window": False}, None),
        (
            {
                "model_type": "qwen2",
                "sliding_window": 32768,
                "layer_types": ["full_attention", "full_attention"],
            },
            None,
        ),  # fmt: skip
        ({"model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": True}, 4096),
        # mlx-lm's llama applies layer_types with a window itself.
        (
            {
                "model_type": "llama",
                "sliding_window": 4096,
                "layer_types": ["sliding_attention", "full_attention"],
            },
            None,
        ),  # fmt: skip
    ],
)
def test_unhonoured_window(config, window):
    assert unhonoured_window(config) == window


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_missing_tie_word_embeddings_means_transformers_default(model_type):
    # mlx-lm's default is True for these: it would drop lm_head.weight and reuse the embeddings.
    config = {k: v for k, v in v4(model_type).items() if k != "tie_word_embeddings"}
    assert normalize(config)["tie_word_embeddings"] is False
    assert normalize({**config, "tie_word_embeddings": True})["tie_word_embeddings"] is True


def test_longrope_short_factor_mlx_lm_skips_is_warned(caplog):
    rope = {"rope_type": "longrope", "short_factor": [1.0] * 16, "long_factor": [2.0] * 16}
    with caplog.at_level("WARNING", logger="mlxrun.hfconfig"):
        normalize(v5("phi3", rope, original_max_position_embeddings=512))
    assert "short_factor" in caplog.text and "512" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="mlxrun.hfconfig"):
        normalize(
            v5("phi3", {**rope, "short_factor": [2.0] * 16}, original_max_position_embeddings=512)
        )
    assert caplog.text == ""


@pytest.mark.parametrize(
    "extra,refused",
    [
        ({}, False),
        ({"mscale": 1.0, "mscale_all_dim": 1.0}, False),  # DeepSeek's pair: the same both ways
        ({"mscale": 0.707, "mscale_all_dim": 0.707}, False),
        ({"mscale_all_dim": 1.0}, True),  # transformers ignores a lone one; mlx-lm divides by it
        ({"mscale": 2.0}, True),
    ],
)
def test_yarn_mscale_read_the_same_way_or_refused(extra, refused):
    config = v5("qwen2", {"rope_type": "yarn", "factor": 4.0, **extra})
    if refused:
        with pytest.raises(UnsupportedModelError, match="mscale"):
            normalize(config)
    else:
        assert normalize(config)["rope_scaling"]["factor"] == 4.0


def test_longrope_factor_for_a_llama_class_uses_its_own_pretraining_length():
    rope = {"rope_type": "longrope", "short_factor": [1.0] * 16, "long_factor": [1.0] * 16,
            "original_max_position_embeddings": 512, "factor": 4.0}  # fmt: skip
    assert normalize(v5("llama", rope))["rope_scaling"]["factor"] == 4.0  # 2048 / 512
    with pytest.raises(UnsupportedModelError, match="factor"):
        normalize(v5("llama", {**rope, "factor": 8.0}))


def test_renamed_keys_fill_the_field_name_but_never_override_it():
    config = {**v5("exaone"), "num_hidden_layers": 2, "rms_norm_eps": 1e-5}
    out = to_legacy(config)
    assert (out["num_layers"], out["layer_norm_epsilon"]) == (2, 1e-5)
    assert to_legacy({**config, "num_layers": 3})["num_layers"] == 3
