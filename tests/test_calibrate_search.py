"""`--calibrate auto` (lowest measured KL), `--max-kl` (smallest recipe under a KL limit), the MoE
8-bit floor, and the CLI flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_convert_errors import assert_one_line_error, run_cli

import mlxrun.convert.calibrated as calibrated_module
from mlxrun.convert.api import convert_model
from mlxrun.convert.recipes import get_recipe, is_moe_router_or_shared, quantization_map
from mlxrun.errors import InvalidRequestError
from mlxrun.models import build_model

FAST = {"calib_samples": 4, "calib_seq_len": 32, "quiet": True}

pytestmark = pytest.mark.model


def _kl(out: Path) -> float:
    return json.loads((out / "quality.json").read_text())["quality"]["kl_divergence"]


def test_auto_keeps_the_method_with_the_lowest_kl(tiny_llama, tmp_path):
    out = tmp_path / "auto"
    r = convert_model(str(tiny_llama), out, bits=3, calibrate="auto", **FAST)
    assert [t["method"] for t in r.tried] == ["awq", "gptq", "dwq"]
    kls = [t["kl_divergence"] for t in r.tried]
    chosen = [t for t in r.tried if t["chosen"]]
    assert len(chosen) == 1 and chosen[0]["kl_divergence"] == min(kls)
    assert r.calibration["method"] == chosen[0]["method"]
    assert r.quality["kl_divergence"] == pytest.approx(min(kls))
    assert _kl(out) == pytest.approx(min(kls))
    card = (out / "README.md").read_text()
    table = card.split("## Candidates measured", 1)[1].split("##", 1)[0]
    assert table.count("| 3-bit g64 |") == 3 and table.count("**chosen**") == 1
    assert not [p for p in out.iterdir() if p.name.startswith(".candidate")]


@pytest.fixture(scope="module")
def ladder_kls(checkpoint_factory, tmp_path_factory) -> tuple[Path, dict[str, float]]:
    """KL of q2, q4 and q8 each converted and measured on its own."""
    src = checkpoint_factory(arch="llama", hidden_size=128, intermediate_size=256)
    root = tmp_path_factory.mktemp("ladder")
    kls = {}
    for name in ("q2", "q4", "q8"):
        convert_model(str(src), root / name, recipe=name, quiet=True)
        kls[name] = _kl(root / name)
    assert kls["q8"] < kls["q4"] < kls["q2"]
    return src, kls


def test_max_kl_picks_the_smallest_recipe_under_the_limit(ladder_kls, tmp_path, monkeypatch):
    """Known by construction: with the limit between q4's and q2's KL, q2 (smaller) fails and
    q4 is the answer; q8, larger, is never converted."""
    src, kls = ladder_kls
    monkeypatch.setattr(calibrated_module, "QUALITY_LADDER", ("q8", "q4", "q2"))
    limit = (kls["q4"] + kls["q2"]) / 2
    out = tmp_path / "pick"
    r = convert_model(str(src), out, max_kl=limit, quiet=True)
    assert json.loads((out / "mlxrun.json").read_text())["recipe_name"] == "q4"
    assert [(t["recipe"], t["chosen"]) for t in r.tried] == [
        ("2-bit g64", False),
        ("4-bit g64", True),
    ]
    assert [t["kl_divergence"] for t in r.tried] == pytest.approx([kls["q2"], kls["q4"]])
    card = (out / "README.md").read_text()
    for t in r.tried:  # KL, top-1 and PPL ratio of every recipe tried
        assert f"{t['ppl_ratio']:.4f}" in card and f"{t['top1_agreement']:.1%}" in card

    loose = convert_model(str(src), tmp_path / "loose", max_kl=kls["q2"] * 2, quiet=True)
    assert [t["recipe"] for t in loose.tried] == ["2-bit g64"]
    with pytest.raises(InvalidRequestError, match="no recipe tried keeps the KL under") as e:
        convert_model(str(src), tmp_path / "none", max_kl=kls["q8"] / 2, quiet=True)
    assert e.value.param == "max_kl" and not (tmp_path / "none").exists()


def test_max_kl_stays_within_the_fit_budget(ladder_kls, tmp_path, monkeypatch):
    """With --fit, recipes larger than the planner's pick are never tried."""
    from mlxrun.convert.checkpoint import load_config
    from mlxrun.convert.plan import estimate

    src, kls = ladder_kls
    monkeypatch.setattr(calibrated_module, "QUALITY_LADDER", ("q8", "q4", "q2"))
    config = load_config(src)
    model = build_model(config)
    q4 = estimate(model, config, get_recipe("q4"), 1, budget_bytes=0)
    q8 = estimate(model, config, get_recipe("q8"), 1, budget_bytes=0)
    budget = int((q4.total_bytes + q8.total_bytes) / 2)  # q4 fits, q8 does not
    with pytest.raises(InvalidRequestError, match="no recipe tried"):
        convert_model(str(src), tmp_path / "x", max_kl=kls["q8"] * 1.01, fit=str(budget),
                      context=1, quiet=True)  # fmt: skip


def test_moe_router_stays_at_8_bits_and_the_card_says_so(checkpoint_factory, tmp_path):
    src = checkpoint_factory(arch="mixtral", dtype="bfloat16")
    plain, cal = tmp_path / "plain", tmp_path / "cal"
    convert_model(str(src), plain, verify=False, quiet=True)
    r = convert_model(str(src), cal, calibrate="gptq", verify=False, **FAST)
    q_plain = json.loads((plain / "config.json").read_text())["quantization"]
    q_cal = json.loads((cal / "config.json").read_text())["quantization"]
    gates = [f"model.layers.{i}.block_sparse_moe.gate" for i in range(2)]
    for g in gates:
        assert g not in q_plain  # plain stays byte-identical to mlx_lm.convert: 4-bit router
        assert q_cal[g]["bits"] == 8
    assert r.moe_kept == {"min_bits": 8, "layers": 2}
    assert "kept at 8 bits or more" in (cal / "README.md").read_text()
    from mlx_lm import load

    load(str(cal))  # plain mlx-lm reads the per-layer override


def test_shared_experts_are_floored_too():
    """qwen2_moe has shared experts and a shared-expert gate beside the router."""
    config = {
        "model_type": "qwen2_moe", "hidden_size": 128, "num_hidden_layers": 1, "vocab_size": 256,
        "intermediate_size": 256, "moe_intermediate_size": 64, "shared_expert_intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts": 4,
        "num_experts_per_tok": 2, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "decoder_sparse_step": 1, "mlp_only_layers": [],
    }  # fmt: skip
    model = build_model(config)
    qmap = quantization_map(model, get_recipe("q3"), moe_floor=True)
    floored = {p for p, q in qmap.items() if q.bits == 8}
    assert floored == {p for p in qmap if is_moe_router_or_shared(p)}
    assert {"model.layers.0.mlp.gate", "model.layers.0.mlp.shared_expert_gate",
            "model.layers.0.mlp.shared_expert.down_proj"} <= floored  # fmt: skip
    assert qmap["model.layers.0.mlp.switch_mlp.gate_proj"].bits == 3


def test_cli_calibrates_and_refuses_conflicts(tiny_llama, tmp_path):
    out = tmp_path / "o"
    proc = run_cli("convert", str(tiny_llama), "-o", str(out), "--calibrate", "gptq",
                   "--calib", str(calibrated_module.__file__), "--no-verify", "-q")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "mlxrun.json").read_text())["calibration"]["method"] == "gptq"
    for args, needles in (
        (["--max-kl", "0.1", "--recipe", "q4"], ("--max-kl", "--recipe")),
        (["--max-kl", "0.1", "--no-verify"], ("--max-kl", "--no-verify")),
        (["--calibrate", "auto", "--no-verify"], ("--calibrate auto", "--no-verify")),
        (["--calibrate", "gptq", "--no-quantize"], ("--no-quantize", "--calibrate")),
        (["--max-kl", "-1"], ("--max-kl must be above 0",)),
    ):
        assert_one_line_error(run_cli("convert", str(tiny_llama), "-o", str(tmp_path / "x"), *args),
                              *needles)  # fmt: skip
