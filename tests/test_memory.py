"""Unified-memory budget and KV-cache arithmetic (pure tier, plus tiny mlx-lm models as oracle)."""

from __future__ import annotations

import mlx.core as mx
import psutil
import pytest
from mlx_lm.models.cache import RotatingKVCache

from mlxrun import memory
from mlxrun.errors import InvalidRequestError, UnsupportedModelError
from mlxrun.models import build_model, make_cache

GiB = 1024**3

LLAMA3_8B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-5,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
}

# Gemma-3-4B's real config.json: the text_config leaves heads and head_dim to the defaults.
GEMMA3_4B = {
    "model_type": "gemma3",
    "text_config": {
        "model_type": "gemma3_text",
        "hidden_size": 2560,
        "intermediate_size": 10240,
        "num_hidden_layers": 34,
        "sliding_window": 1024,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
    },
    "vision_config": {"model_type": "siglip_vision_model"},
}


def tiny(model_type: str, **extra) -> dict:
    cfg = {
        "model_type": model_type,
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-6,
        "vocab_size": 128,
        "tie_word_embeddings": True,
    }
    cfg.update(extra)
    return cfg


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv(memory.BUDGET_ENV, raising=False)


# --- device memory ----------------------------------------------------------------------------


@pytest.mark.pure
def test_fallback_is_three_quarters_of_ram_off_metal(no_env):
    assert memory._metal_device_info() is None  # this machine has no Metal
    dev = memory.device_memory()
    total = psutil.virtual_memory().total
    assert dev.total_bytes == total
    assert dev.recommended_bytes is None
    assert dev.budget_bytes == int(total * 0.75)
    assert dev.source == "ram-fraction"


@pytest.mark.pure
def test_metal_branch_plans_against_recommended_working_set(monkeypatch, no_env):
    info = {"memory_size": 64 * GiB, "max_recommended_working_set_size": 48 * GiB}
    monkeypatch.setattr(memory, "_metal_device_info", lambda: info)
    dev = memory.device_memory()
    assert dev == memory.DeviceMemory(64 * GiB, 48 * GiB, 48 * GiB, "metal")


@pytest.mark.pure
def test_metal_info_without_working_set_falls_back(monkeypatch, no_env):
    # Metal "available" but the real mx.device_info() of this CPU build has no working-set key.
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    assert "max_recommended_working_set_size" not in mx.device_info()
    assert memory._metal_device_info() is None
    assert memory.device_memory().source == "ram-fraction"


@pytest.mark.pure
def test_metal_info_call_that_raises_falls_back(monkeypatch, no_env):
    def broken():
        raise RuntimeError("no device")

    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(mx, "device_info", broken)
    assert memory._metal_device_info() is None
    assert memory.device_memory().source == "ram-fraction"


@pytest.mark.pure
def test_older_mlx_without_top_level_device_info(monkeypatch, no_env):
    info = {"memory_size": 16 * GiB, "max_recommended_working_set_size": 11 * GiB}
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.delattr(mx, "device_info")
    monkeypatch.setattr(mx.metal, "device_info", lambda: info, raising=False)
    dev = memory.device_memory()
    assert (dev.budget_bytes, dev.total_bytes, dev.source) == (11 * GiB, 16 * GiB, "metal")


@pytest.mark.pure
def test_env_override(monkeypatch):
    monkeypatch.setenv(memory.BUDGET_ENV, "16GB")
    dev = memory.device_memory()
    assert dev.budget_bytes == 16 * 10**9
    assert dev.source == "env"
    assert dev.total_bytes == psutil.virtual_memory().total

    monkeypatch.setattr(
        memory, "_metal_device_info",
        lambda: {"memory_size": 32 * GiB, "max_recommended_working_set_size": 24 * GiB},
    )  # fmt: skip
    monkeypatch.setenv(memory.BUDGET_ENV, "512MiB")
    dev = memory.device_memory()
    assert (dev.budget_bytes, dev.recommended_bytes, dev.source) == (512 << 20, 24 * GiB, "env")


@pytest.mark.pure
def test_env_override_unreadable(monkeypatch):
    monkeypatch.setenv(memory.BUDGET_ENV, "lots")
    with pytest.raises(InvalidRequestError) as err:
        memory.device_memory()
    assert err.value.param == memory.BUDGET_ENV


# --- wired limit --------------------------------------------------------------------------------


@pytest.mark.pure
def test_wired_limit_is_a_noop_without_metal(monkeypatch):
    calls = []
    monkeypatch.setattr(memory, "_metal_set_wired_limit", lambda n: calls.append(n) or 0)
    with memory.wired_limit(8 * GiB):
        x = mx.ones((4,)) * 2
        mx.eval(x)
    assert calls == []


@pytest.mark.pure
def test_wired_limit_raises_then_restores_on_metal(monkeypatch):
    info = {"memory_size": 32 * GiB, "max_recommended_working_set_size": 24 * GiB}
    limits = [0]

    def set_limit(n):  # records every limit set; returns the previous one, as mlx does
        limits.append(n)
        return limits[-2]

    monkeypatch.setattr(memory, "_metal_device_info", lambda: info)
    monkeypatch.setattr(memory, "_metal_set_wired_limit", set_limit)
    with memory.wired_limit(8 * GiB):
        assert limits[-1] == 8 * GiB
    assert limits == [0, 8 * GiB, 0]

    # Clamped to the working set, and restored even when the body fails.
    with pytest.raises(ValueError), memory.wired_limit(100 * GiB):
        assert limits[-1] == 24 * GiB
        raise ValueError("boom")
    assert limits[-1] == 0


# --- KV cache ----------------------------------------------------------------------------------


@pytest.mark.pure
def test_llama3_8b_is_128_kib_per_token():
    assert memory.kv_cache_bytes(LLAMA3_8B, 1) == 32 * 8 * 128 * 2 * 2 == 128 * 1024
    assert memory.kv_cache_bytes(LLAMA3_8B, 8192) == 1 * GiB
    assert memory.kv_cache_bytes(LLAMA3_8B, 8192, dtype_bytes=1) == GiB // 2


@pytest.mark.pure
def test_mha_defaults_kv_heads_and_head_dim():
    cfg = dict(LLAMA3_8B)
    del cfg["num_key_value_heads"]  # MHA: as many KV heads as query heads
    layout = memory.kv_layout(cfg)
    assert (layout.n_kv_heads, layout.head_dim, layout.num_layers) == (32, 128, 32)
    assert memory.kv_cache_bytes(cfg, 100) == 32 * 2 * 32 * 128 * 100 * 2


@pytest.mark.pure
def test_explicit_head_dim_wins_over_hidden_over_heads():
    # Mistral-Nemo: hidden 5120 / 32 heads would say 160, but head_dim is 128.
    cfg = dict(LLAMA3_8B, model_type="mistral", hidden_size=5120, num_hidden_layers=40,
               head_dim=128, sliding_window=None)  # fmt: skip
    assert memory.kv_cache_bytes(cfg, 1) == 40 * 2 * 8 * 128 * 2


@pytest.mark.pure
def test_gemma3_nested_text_config_and_sliding_window():
    layout = memory.kv_layout(GEMMA3_4B)
    # The gemma3 wrapper's defaults (8 heads, 4 KV) and gemma3_text's head_dim 256.
    assert (layout.n_kv_heads, layout.head_dim, layout.num_layers) == (4, 256, 34)
    global_layers = [i for i, w in enumerate(layout.windows) if w is None]
    assert global_layers == [5, 11, 17, 23, 29]
    per_layer_token = 2 * 4 * 256 * 2
    assert memory.kv_cache_bytes(GEMMA3_4B, 8192) == per_layer_token * (5 * 8192 + 29 * 1024)
    # Under the window every layer holds the whole context.
    assert memory.kv_cache_bytes(GEMMA3_4B, 500) == per_layer_token * 34 * 500


@pytest.mark.pure
def test_layer_types_mark_sliding_layers():
    cfg = tiny("llama", sliding_window=8,
               layer_types=["sliding_attention", "full_attention"] * 2)  # fmt: skip
    per = 2 * 2 * 16 * 2
    assert memory.kv_cache_bytes(cfg, 100) == per * (2 * 100 + 2 * 8)


@pytest.mark.pure
def test_configs_whose_window_mlx_lm_ignores_hold_full_context():
    # mistral v0.1 names a 4096 window but runs as llama with full caches; mlx-lm's gemma2 too.
    mistral = tiny("mistral", sliding_window=4096)
    gemma2 = tiny("gemma2", sliding_window=32,
                  layer_types=["sliding_attention", "full_attention"] * 2)  # fmt: skip
    qwen2 = tiny("qwen2", sliding_window=32, use_sliding_window=False)
    for cfg in (mistral, gemma2, qwen2):
        assert memory.kv_layout(cfg).windows == (None,) * 4
        assert memory.kv_cache_bytes(cfg, 10_000) == 4 * 2 * 2 * 16 * 10_000 * 2


@pytest.mark.model
def test_kv_layout_matches_mlx_lm_models():
    cases = [
        tiny("llama"),
        tiny("mistral", sliding_window=16),
        tiny("llama", sliding_window=16, layer_types=["full_attention", "sliding_attention"] * 2),
        tiny("gemma2", sliding_window=16, layer_types=["sliding_attention", "full_attention"] * 2),
        tiny("gemma3_text", sliding_window=16, sliding_window_pattern=2),
        tiny("qwen3", max_position_embeddings=512, rope_theta=1e6),
        tiny("cohere2", layer_norm_eps=1e-5, sliding_window=16, num_hidden_layers=8),
    ]
    for cfg in cases:
        model = build_model(cfg)
        layout = memory.kv_layout(cfg)
        caches = make_cache(model)
        windows = tuple(c.max_size if isinstance(c, RotatingKVCache) else None for c in caches)
        assert layout.windows == windows, cfg["model_type"]
        k_proj = model.layers[0].self_attn.k_proj.weight
        assert k_proj.shape[0] == layout.n_kv_heads * layout.head_dim, cfg["model_type"]


@pytest.mark.model
def test_kv_bytes_match_a_real_cache_after_prefill_and_decode():
    """Prefill 255 tokens and decode 1: full layers hold 256 tokens (mlx-lm grows caches in steps
    of 256) and window layers are trimmed back to the window."""
    cfg = tiny("gemma3_text", sliding_window=16, sliding_window_pattern=2)
    model = build_model(cfg)
    model.set_dtype(mx.bfloat16)
    cache = make_cache(model)
    model(mx.arange(255)[None] % 128, cache=cache)
    model(mx.array([[3]]), cache=cache)
    mx.eval([c.state for c in cache])
    real = sum(c.keys.nbytes + c.values.nbytes for c in cache)
    assert real == memory.kv_cache_bytes(cfg, 256)


@pytest.mark.pure
def test_unreadable_config():
    with pytest.raises(UnsupportedModelError):
        memory.kv_cache_bytes({"model_type": "mystery", "hidden_size": 64}, 10)


# --- margin and footprint ---------------------------------------------------------------------


@pytest.mark.pure
def test_runtime_margin_and_footprint():
    margin = memory.runtime_margin_bytes(LLAMA3_8B, 8192)
    expected = memory.RUNTIME_MARGIN_BYTES + 2048 * 4096 * memory.ACTIVATION_BYTES_PER_TOKEN_HIDDEN
    assert margin == expected
    # Short contexts only pay activations for the tokens they have.
    short = memory.runtime_margin_bytes(LLAMA3_8B, 100)
    assert (
        short == memory.RUNTIME_MARGIN_BYTES + 100 * 4096 * memory.ACTIVATION_BYTES_PER_TOKEN_HIDDEN
    )
    assert memory.footprint(4 * 10**9, LLAMA3_8B, 8192) == 4 * 10**9 + GiB + margin


@pytest.mark.pure
def test_margin_counts_sliding_prefill_overshoot():
    per_layer_token = 2 * 4 * 256 * 2
    base = memory.RUNTIME_MARGIN_BYTES + 2048 * 2560 * memory.ACTIVATION_BYTES_PER_TOKEN_HIDDEN
    # 29 window layers hold up to 1023 + 2048 tokens while a chunk is in flight.
    overshoot = 29 * per_layer_token * (1023 + 2048 - 1024)
    assert memory.runtime_margin_bytes(GEMMA3_4B, 8192) == base + overshoot
