"""Memory-fit planner: byte-exact estimates against real mlx quantization, and the ladder walk."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from mlxrun import memory
from mlxrun.convert import plan as planner
from mlxrun.convert.recipes import QUALITY_LADDER, get_recipe, quantization_map
from mlxrun.errors import InsufficientMemoryError, format_size
from mlxrun.models import build_model

pytestmark = pytest.mark.model

TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 128,
    # 320 divides 64 but not 128: at g128 mlp.down_proj stays unquantized.
    "intermediate_size": 320,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "vocab_size": 256,
    "tie_word_embeddings": False,
}

TINY_MOE = {
    "model_type": "qwen3_moe",
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "intermediate_size": 256,
    "moe_intermediate_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "rms_norm_eps": 1e-6,
    "vocab_size": 256,
    "rope_theta": 1e6,
    "tie_word_embeddings": True,
    "max_position_embeddings": 512,
    "norm_topk_prob": True,
}

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

GB = 10**9


def real_quantized_bytes(config: dict, recipe) -> int:
    """Quantize a bf16 tiny model with mlx itself, layer by layer as the map says, and count."""
    model = build_model(config)
    model.set_dtype(mx.bfloat16)
    qmap = quantization_map(model, recipe)
    nn.quantize(
        model,
        class_predicate=lambda path, _: qmap[path].as_config() if path in qmap else False,
    )
    mx.eval(model.parameters())
    return sum(a.nbytes for _, a in tree_flatten(model.parameters()))


@pytest.mark.parametrize(
    "name,group_size",
    [("q2", 64), ("q3", 64), ("q4", 64), ("q5", 32), ("q6", 64), ("q8", 128),
     ("mixed_3_6", 64), ("mixed_4_8", 128), ("mixed_2_6", 32)],
)  # fmt: skip
def test_estimate_is_byte_exact_on_tiny_llama(name, group_size):
    recipe = get_recipe(name, group_size=group_size)
    plan = planner.estimate(build_model(TINY_LLAMA), TINY_LLAMA, recipe, 64, budget_bytes=GB)
    assert plan.weights_bytes == real_quantized_bytes(TINY_LLAMA, recipe)


@pytest.mark.parametrize("name", ["q4", "mixed_3_6", "q8"])
def test_estimate_is_byte_exact_on_tiny_moe(name):
    recipe = get_recipe(name)
    model = build_model(TINY_MOE)
    plan = planner.estimate(model, TINY_MOE, recipe, 64, budget_bytes=GB)
    assert plan.weights_bytes == real_quantized_bytes(TINY_MOE, recipe)
    rows = {r.name: r for r in plan.components}
    # Experts: 2 layers × 4 experts × 3 matrices of 64×128.
    assert rows["experts"].params == 2 * 4 * 3 * 64 * 128
    # The router (mlp.gate, 4×128) is kept at 8 bits by qwen3_moe's own predicate.
    assert rows["mlp"].params == 2 * 4 * 128
    assert rows["mlp"].nbytes == 2 * (4 * 128 + 2 * (4 * 128 // 64) * 2)


def test_unquantized_estimate_is_the_float_checkpoint():
    model = build_model(TINY_LLAMA)
    plan = planner.estimate(model, TINY_LLAMA, None, 64, budget_bytes=GB)
    model.set_dtype(mx.bfloat16)
    n_params = sum(a.size for _, a in tree_flatten(model.parameters()))
    assert plan.weights_bytes == 2 * n_params
    assert plan.bits_per_weight == 16.0
    assert planner.estimate(model, TINY_LLAMA, None, 64, 4, budget_bytes=GB).weights_bytes == (
        4 * n_params
    )


def test_plan_totals_and_components():
    config = TINY_LLAMA
    plan = planner.estimate(build_model(config), config, get_recipe("q4"), 300, budget_bytes=GB)
    assert sum(r.nbytes for r in plan.components) == plan.weights_bytes
    assert [r.name for r in plan.components] == [
        "embeddings", "attention", "mlp", "lm_head", "norms/other",
    ]  # fmt: skip
    assert plan.kv_bytes == memory.kv_cache_bytes(config, 300)
    assert plan.margin_bytes == memory.runtime_margin_bytes(config, 300)
    assert plan.total_bytes == plan.weights_bytes + plan.kv_bytes + plan.margin_bytes
    assert plan.fits and plan.spare_bytes == GB - plan.total_bytes
    rows = {r.name: r for r in plan.components}
    assert rows["attention"].bits_per_weight == 4.5  # 4 bits + 2 × 16 bits per 64 weights
    assert rows["norms/other"].bits_per_weight == 16.0


def test_estimate_defaults_to_this_machines_budget(monkeypatch):
    monkeypatch.setenv(memory.BUDGET_ENV, "3GB")
    plan = planner.estimate(build_model(TINY_LLAMA), TINY_LLAMA, get_recipe("q4"), 64)
    assert plan.budget_bytes == 3 * GB


def ladder_totals(model, config, context):
    return [
        planner.estimate(model, config, get_recipe(n), context, budget_bytes=0).total_bytes
        for n in QUALITY_LADDER
    ]


def test_choose_plan_walks_the_ladder():
    model = build_model(TINY_LLAMA)
    context = 4096
    totals = ladder_totals(model, TINY_LLAMA, context)
    for i, budget in enumerate(totals):  # exactly enough for rung i
        chosen = planner.choose_plan(model, TINY_LLAMA, budget, context)
        k = QUALITY_LADDER.index(chosen.recipe.name)
        assert k <= i and chosen.fits and chosen.total_bytes <= budget
        assert all(t > budget for t in totals[:k])  # everything better did not fit


def test_bigger_budget_never_picks_lower_quality():
    model = build_model(TINY_LLAMA)
    totals = ladder_totals(model, TINY_LLAMA, 1024)
    budgets = sorted(set(totals))
    picks = [
        QUALITY_LADDER.index(planner.choose_plan(model, TINY_LLAMA, b, 1024).recipe.name)
        for b in budgets
    ]
    assert picks == sorted(picks, reverse=True)
    assert picks[-1] == 0  # the largest total is q8's


def test_nothing_fits():
    model = build_model(TINY_LLAMA)
    totals = ladder_totals(model, TINY_LLAMA, 2048)
    smallest = min(totals)
    budget = smallest - 12345
    with pytest.raises(InsufficientMemoryError) as err:
        planner.choose_plan(model, TINY_LLAMA, budget, 2048)
    e = err.value
    assert (e.needed, e.available, e.missing) == (smallest, budget, 12345)
    assert format_size(12345) in e.message and "q2" in e.message and "2048" in e.message
    assert "--context" in e.hint


def test_group_size_reaches_the_recipes():
    model = build_model(TINY_LLAMA)
    chosen = planner.choose_plan(model, TINY_LLAMA, 10 * GB, 64, group_size=32)
    assert (chosen.recipe.name, chosen.recipe.group_size) == ("q8", 32)


# --- Llama-3-8B, by hand -------------------------------------------------------------------


def llama3_8b_numels() -> tuple[int, int]:
    """(numel of quantizable matrices, numel of norm vectors) from the published dims."""
    h, n_layers, inter, vocab, kv_dim = 4096, 32, 14336, 128256, 8 * 128
    attention = 2 * h * h + 2 * h * kv_dim  # q, o; k, v
    mlp = 3 * h * inter
    matrices = 2 * vocab * h + n_layers * (attention + mlp)  # embeddings + lm_head
    norms = n_layers * 2 * h + h
    return matrices, norms


def by_hand_total(bits: int, context: int) -> int:
    matrices, norms = llama3_8b_numels()
    weights = matrices * bits // 8 + 2 * (matrices // 64) * 2 + 2 * norms
    kv = 32 * 2 * 8 * 128 * 2 * context
    return weights + kv + memory.runtime_margin_bytes(LLAMA3_8B, context)


def test_llama3_8b_estimate_by_hand():
    model = build_model(LLAMA3_8B)  # lazy: 8B parameters are never materialized
    plan = planner.estimate(model, LLAMA3_8B, get_recipe("q4"), 8192, budget_bytes=16 * GB)
    matrices, norms = llama3_8b_numels()
    assert plan.weights_bytes == matrices * 9 // 16 + 2 * norms  # 4.5 bits per weight
    assert 4.4 * GB < plan.weights_bytes < 4.6 * GB
    assert plan.kv_bytes == 1024**3
    assert plan.total_bytes == by_hand_total(4, 8192)


def test_llama3_8b_choices():
    model = build_model(LLAMA3_8B)
    big = planner.choose_plan(model, LLAMA3_8B, 16 * GB, 8192)
    assert by_hand_total(8, 8192) < 16 * GB  # q8 fits in 16 GB with room
    assert big.recipe.name == "q8" and big.total_bytes == by_hand_total(8, 8192)

    small = planner.choose_plan(model, LLAMA3_8B, 6 * GB, 8192)
    assert by_hand_total(4, 8192) > 6 * GB > by_hand_total(3, 8192)
    # So the pick is below q4 on the ladder and no lower than q3.
    idx = QUALITY_LADDER.index(small.recipe.name)
    assert QUALITY_LADDER.index("q4") < idx <= QUALITY_LADDER.index("q3")
    assert small.fits and small.total_bytes <= 6 * GB


def test_plan_table():
    model = build_model(TINY_LLAMA)
    fits = planner.estimate(model, TINY_LLAMA, get_recipe("mixed_4_8"), 256, budget_bytes=GB)
    text = planner.format_plan_table(fits)
    for needle in ("mixed_4_8 g64", "embeddings", "attention", "mlp", "lm_head", "norms/other",
                   "KV cache (256 tokens)", "runtime margin", "total", "budget", "verdict: fits",
                   format_size(fits.weights_bytes), format_size(fits.total_bytes)):  # fmt: skip
        assert needle in text, needle
    short = planner.estimate(model, TINY_LLAMA, None, 256, budget_bytes=1000)
    text = planner.format_plan_table(short)
    assert "unquantized (16-bit)" in text
    assert f"does not fit ({format_size(short.total_bytes - 1000)} short)" in text
