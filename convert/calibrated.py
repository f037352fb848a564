"""What `convert_model` calls for `--calibrate` and `--max-kl`.

`run_calibration` turns the calibration text into token rows and runs the layer-by-layer pass
(convert/calibrate.py) into a scratch folder inside the partial output. `search` converts several
candidates (methods for `--calibrate auto`, recipes for `--max-kl`) each into its own folder,
measures each one's KL against the source on the held-out sample, keeps the chosen one and records
every one tried for the model card.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from mlxrun.convert.calibrate import METHODS, CalibrationResult, calibrate
from mlxrun.convert.recipes import QUALITY_LADDER, Recipe, get_recipe
from mlxrun.errors import InvalidRequestError

SCRATCH = ".calibration"


def run_calibration(
    ckpt, qmap, dtype, cast_pred, tmp: Path, opts
) -> tuple[CalibrationResult, Path]:
    from mlx_lm.utils import load_tokenizer

    from mlxrun.convert.calib_data import calib_tokens, read_calib_set
    from mlxrun.convert.quantize import target_dtype_for

    calib = read_calib_set(opts.calib)
    tokens = calib_tokens(load_tokenizer(ckpt.path), calib, opts.calib_samples, opts.calib_seq_len)

    def out_dtype(name, src):
        return target_dtype_for(name, src, dtype, cast_pred)

    scratch = tmp / SCRATCH
    result = calibrate(ckpt, qmap, out_dtype, tokens, opts.calibrate, scratch, calib.label)
    return result, scratch


def calibration_info(result: CalibrationResult) -> dict:
    info = asdict(result)
    info.pop("scratch")
    info["seconds"] = round(info["seconds"], 2)
    return info


@dataclass(frozen=True)
class Candidate:
    recipe: Recipe
    method: str | None  # the calibration method, None for plain rounding

    @property
    def label(self) -> str:
        return self.recipe.label + (f" + {self.method}" if self.method else "")


def candidates(model, config: dict, opts, recipe: Recipe) -> list[Candidate]:
    """What a search tries, in order: methods for `auto`; for --max-kl the recipes smallest
    first (those that fit --fit's budget when given), each with the requested method."""
    methods = list(METHODS) if opts.calibrate == "auto" else [opts.calibrate]
    if opts.max_kl is None:
        return [Candidate(recipe, m) for m in methods]
    from mlxrun.convert.plan import estimate

    gs = opts.group_size_or_default
    plans = [estimate(model, config, get_recipe(n, group_size=gs), 1) for n in QUALITY_LADDER]
    if opts.fit:
        from mlxrun.convert.api import plan_context
        from mlxrun.convert.plan import choose_plan
        from mlxrun.errors import parse_size
        from mlxrun.memory import device_memory

        budget = device_memory().budget_bytes if opts.fit == "auto" else parse_size(opts.fit)
        best = choose_plan(model, config, budget, plan_context(config, opts.context), group_size=gs)
        plans = [p for p in plans if p.weights_bytes <= best.weights_bytes]
    plans.sort(key=lambda p: p.weights_bytes)
    return [Candidate(p.recipe, m) for p in plans if p.recipe is not None for m in methods]


def _row(c: Candidate, result: dict) -> dict:
    q = result.get("quality") or {}
    return {
        "recipe": c.recipe.label, "method": c.method or "none",
        "bits_per_weight": result["bits_per_weight"], "size_bytes": result["size_bytes"],
        "kl_divergence": q.get("kl_divergence"), "top1_agreement": q.get("top1_agreement"),
        "ppl_ratio": q.get("ppl_ratio"), "quality_method": q.get("method"),
    }  # fmt: skip


def search(tmp: Path, opts, todo: list[Candidate], convert_one: Callable) -> tuple[dict, list]:
    """Convert candidates into tmp/.candidate-N; keep the chosen one's files in `tmp`.

    `auto` alone: the lowest KL. --max-kl: the first (smallest) under the limit; candidates past
    it are not converted. convert_one(dir, candidate) -> the result dict of one conversion.
    """
    tried: list[tuple[Candidate, dict, Path]] = []
    chosen = None
    for i, c in enumerate(todo):
        where = tmp / f".candidate-{i}"
        where.mkdir()
        result = convert_one(where, c)
        kl = (result.get("quality") or {}).get("kl_divergence")
        if kl is None:
            raise InvalidRequestError(
                "the KL of a candidate could not be measured end to end (the source and the "
                "converted model must both fit in memory); --max-kl and --calibrate auto need it",
                param="max_kl" if opts.max_kl is not None else "calibrate",
            )
        tried.append((c, result, where))
        last_of_recipe = i + 1 == len(todo) or todo[i + 1].recipe != c.recipe
        if opts.max_kl is not None and last_of_recipe:
            best = _best([t for t in tried if t[0].recipe == c.recipe])
            if best[1]["quality"]["kl_divergence"] <= opts.max_kl:
                chosen = best
                break
    if chosen is None:
        if opts.max_kl is not None:
            best = _best(tried)
            raise InvalidRequestError(
                f"no recipe tried keeps the KL under {opts.max_kl}: the best, "
                f"{best[0].label}, measured {best[1]['quality']['kl_divergence']:.4g}",
                param="max_kl",
                hint="Raise --max-kl, or give --fit a larger budget so larger recipes are tried.",
            )
        chosen = _best(tried)
    for item in chosen[2].iterdir():
        shutil.move(str(item), tmp / item.name)
    for _, _, where in tried:
        shutil.rmtree(where, ignore_errors=True)
    return chosen[1], [_row(c, r) | {"chosen": c is chosen[0]} for c, r, _ in tried]


def _best(tried: list) -> tuple:
    return min(tried, key=lambda t: t[1]["quality"]["kl_divergence"])
