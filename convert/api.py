"""`convert_model`: the whole conversion, written into a temporary sibling and renamed at the end."""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from mlxrun.convert.cancel import add_cleanup, exit_now, interruptible, shield
from mlxrun.convert.checkpoint import open_checkpoint
from mlxrun.convert.options import DEFAULT_CONTEXT, ConvertOptions, check_conflicts
from mlxrun.convert.recipes import Recipe, config_section, get_recipe, quantization_map
from mlxrun.errors import (
    ConversionInterruptedError,
    DiskFullError,
    InvalidRequestError,
    OutputExistsError,
    UnsupportedModelError,
)
from mlxrun.models import build_model

if TYPE_CHECKING:
    import mlx.core as mx

    from mlxrun.convert.checkpoint import SourceCheckpoint
    from mlxrun.models import ModelProtocol

# Files copied verbatim so tokenization and templates behave exactly as the source's.
SIDECAR_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
    "generation_config.json", "preprocessor_config.json",
)  # fmt: skip
SIDECAR_GLOBS = ("*.tiktoken",)
PARTIAL_TAG = ".mlxrun-partial-"


@dataclass(frozen=True)
class ConvertResult:
    output: Path
    source: str
    architecture: str
    recipe: str
    bits_per_weight: float
    size_bytes: int
    num_tensors: int
    seconds: float
    quality: dict | None = field(default=None)
    calibration: dict | None = None  # method, calibration set, tokens, seconds (--calibrate)
    moe_kept: dict | None = None  # routers/shared experts kept at >= 8 bits (calibrated MoE)
    tried: list | None = None  # every candidate of --calibrate auto / --max-kl, with its KL
    write_seconds: float = 0.0  # reading, quantizing and writing the weights
    verify_seconds: float | None = None  # the quality check; None under --no-verify


def _say(opts: ConvertOptions, msg: str) -> None:
    if not opts.quiet:
        print(msg, file=sys.stderr, flush=True)


def _warn(msg: str) -> None:
    # Warnings are shown even with --quiet: they say the result differs from what was asked.
    print(f"Warning: {msg}", file=sys.stderr, flush=True)


def plan_context(config: dict, requested: int | None) -> int:
    """The context the planner reserves KV cache for: never past the model's own maximum."""
    from mlxrun.store import context_length

    limit = context_length(config)
    if requested is None:
        return min(DEFAULT_CONTEXT, limit) if limit else DEFAULT_CONTEXT
    if limit and requested > limit:
        _warn(f"--context {requested} is beyond the model's maximum of {limit} tokens; "
              f"planning for {limit}")  # fmt: skip
        return limit
    return requested


def _choose_recipe(
    model: ModelProtocol, config: dict[str, Any], opts: ConvertOptions
) -> Recipe | None:
    if not opts.quantize:
        return None
    if opts.fit:
        from mlxrun.convert.plan import choose_plan
        from mlxrun.errors import parse_size
        from mlxrun.memory import device_memory

        budget = device_memory().budget_bytes if opts.fit == "auto" else parse_size(opts.fit)
        context = plan_context(config, opts.context)
        plan = choose_plan(model, config, budget, context, group_size=opts.group_size_or_default,
                           hosts=opts.hosts)  # fmt: skip
        return plan.recipe
    return get_recipe(opts.recipe, bits=opts.bits_or_default, group_size=opts.group_size_or_default)


def default_output(source: str, recipe: Recipe | None) -> Path:
    from mlxrun.store import default_name, models_dir

    if recipe is None:
        suffix = "mlx"
    elif recipe.high_bits is None:
        suffix = f"{recipe.bits}bit"  # as the mlx-community models are named
    else:
        suffix = recipe.name
    return models_dir() / f"{default_name(source)}-{suffix}"


def _check_output(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputExistsError(f"{out} already exists and is not empty")


def _remove_stale_partials(parent: Path, name: str) -> None:
    """Remove temp dirs left by conversions that were killed (SIGKILL cannot be cleaned up after)."""
    for p in parent.glob(f".{name}{PARTIAL_TAG}*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _copy_sidecars(src: Path, dst: Path) -> None:
    names = [n for n in SIDECAR_FILES if (src / n).is_file()]
    names += [p.name for g in SIDECAR_GLOBS for p in src.glob(g)]
    for n in names:
        shutil.copyfile(src / n, dst / n)


def _write_config(config: dict, recipe: Recipe | None, qmap: dict, out: Path) -> None:
    config = dict(config)
    config.pop("_name_or_path", None)
    config.pop("quantization_config", None)
    if recipe is not None:
        config["quantization"] = config_section(recipe, qmap)
        config["quantization_config"] = config["quantization"]  # HF-tree readers look here
    (out / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=4))


def _install(tmp: Path, out: Path) -> None:
    """Atomically put the finished model at `out` (replacing an old one only now, when forced)."""
    if out.exists():
        trash = out.parent / f".{out.name}.mlxrun-old-{os.getpid()}"
        out.rename(trash)
        tmp.rename(out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.rename(out)


def convert_model(source: str, output: str | Path | None = None, **options) -> ConvertResult:
    """Convert a local checkpoint dir or Hub repo id into MLX weights at `output`.

    Nothing is ever left at `output` unless the conversion finished: work happens in a hidden
    sibling directory that is renamed into place at the end. Ctrl-C or SIGTERM in any phase
    (download, quantization, quality check) stops it within a second (convert/cancel.py).
    """
    opts = ConvertOptions(**options)
    check_conflicts(opts)
    if opts.calib is not None and opts.calibrate is not None:
        from mlxrun.convert.calib_data import read_calib_set

        read_calib_set(opts.calib)  # unreadable calibration data fails before any work
    elif opts.calib is not None and (Path(opts.calib).is_dir() or not Path(opts.calib).exists()):
        # Fail before converting rather than after; the file is read in the quality step.
        raise InvalidRequestError(f"calibration file {opts.calib} does not exist", param="calib")
    where = {"out": None}

    def interrupted() -> ConversionInterruptedError:
        out = where["out"]
        said = f"nothing was written to {out}" if out else "nothing was written"
        return ConversionInterruptedError(f"conversion interrupted; {said}")

    with interruptible(opts.exit_on_signal, interrupted) as watcher:
        try:
            return _convert(source, output, opts, watcher, where)
        except KeyboardInterrupt:
            error = interrupted()  # the temporary output is gone already
    if opts.exit_on_signal is not None:
        exit_now(opts.exit_on_signal, error)  # stop within the second, as the watcher would
    raise error


def _convert(source: str, output, opts: ConvertOptions, watcher, where: dict) -> ConvertResult:
    from mlxrun.hub import resolve_source

    src = resolve_source(source, revision=opts.revision, progress=not opts.quiet)
    ckpt = open_checkpoint(src)
    if ckpt.is_mlx:
        raise UnsupportedModelError(
            f"{source} is already an MLX quantized model",
            hint="Use it directly, or `mlxrun pull` it into the store.",
        )
    if opts.calib is not None and opts.calibrate is None and Path(opts.calib).is_file():
        from mlxrun.convert.verify import check_calib

        check_calib(src, opts.calib)  # a pipe can be read once only: that is in the quality step
    model = build_model(ckpt.config)
    recipe = _choose_recipe(model, ckpt.config, opts)
    out = Path(output) if output is not None else default_output(source, recipe)
    _check_output(out, opts.force)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out.parent, out.name)
    tmp = out.parent / f".{out.name}{PARTIAL_TAG}{os.getpid()}"
    where["out"] = out
    add_cleanup(watcher, lambda: shutil.rmtree(tmp, ignore_errors=True))
    tmp.mkdir()
    label = recipe.label if recipe else (opts.dtype or "unquantized")
    _say(opts, f"Converting {source} ({ckpt.model_type}) -> {out} [{label}]")
    t0 = time.perf_counter()
    try:
        result = _convert_some(tmp, ckpt, model, recipe, source, opts)
        with shield(watcher):
            _install(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise DiskFullError(f"no space left while writing to {out.parent}") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - t0
    result = {**result, "output": out, "seconds": seconds}
    _say(opts, _summary(result, out))
    return ConvertResult(**result)


def _summary(result: dict, out: Path) -> str:
    from mlxrun.errors import format_size

    check = result.get("verify_seconds")
    timing = (
        f"weights {result['write_seconds']:.1f}s, quality check {check:.1f}s; --no-verify skips it"
        if check is not None
        else f"weights {result['write_seconds']:.1f}s, no quality check"
    )
    return (
        f"Done in {result['seconds']:.1f}s ({timing}): {result['num_tensors']} tensors, "
        f"{format_size(result['size_bytes'])}, {result['bits_per_weight']:.3f} bits/weight "
        f"-> {out}"
    )


def _convert_into(
    tmp: Path,
    ckpt: SourceCheckpoint,
    model: ModelProtocol,
    recipe: Recipe | None,
    source: str,
    opts: ConvertOptions,
) -> dict[str, Any]:
    from mlx.utils import tree_flatten

    from mlxrun.convert.progress import ByteProgress
    from mlxrun.convert.quantize import (
        check_against_model,
        load_lazy,
        make_jobs,
        target_dtype,
        write_jobs,
    )

    weights = load_lazy(ckpt, model)
    check_against_model(weights, model)
    flat = cast("list[tuple[str, mx.array]]", tree_flatten(model.parameters()))
    total_params = sum(v.size for _, v in flat)
    floor = opts.calibrate is not None or opts.max_kl is not None
    qmap = quantization_map(model, recipe, moe_floor=floor) if recipe else {}
    dtype = target_dtype(ckpt.config, opts.dtype)
    cast_pred = getattr(model, "cast_predicate", lambda _k: True)
    calibration, overrides = _calibrate(tmp, ckpt, qmap, dtype, cast_pred, recipe, opts)
    jobs = make_jobs(weights, qmap, dtype, cast_pred, overrides)
    total_src = sum(j[2] for j in jobs)
    num_out = sum(len(j[0]) for j in jobs)  # output tensors: a quantized weight adds scales, biases
    t0 = time.perf_counter()
    with ByteProgress(total_src, num_out, enabled=not opts.quiet) as bar:
        written = write_jobs(
            jobs, tmp, max_shard_bytes=opts.max_shard_bytes, on_progress=bar.update
        )
    write_seconds = time.perf_counter() - t0
    shutil.rmtree(tmp / ".calibration", ignore_errors=True)
    index = written.index
    index["metadata"]["total_parameters"] = total_params
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))
    _write_config(ckpt.config, recipe, qmap, tmp)
    _copy_sidecars(ckpt.path, tmp)
    bpw = written.total_bytes * 8 / max(1, total_params)
    from mlxrun.store import weight_bytes

    info = {
        "source": source,
        "architecture": ckpt.model_type,
        "recipe": recipe.label if recipe else "unquantized",
        "bits_per_weight": round(bpw, 4),
        "size_bytes": weight_bytes(tmp),  # on disk, headers included: what `mlxrun list` shows
        "num_tensors": written.num_tensors,
        **_calibration_facts(calibration, qmap if floor else {}),
    }
    quality, verify_seconds = _check_quality(tmp, ckpt, info, recipe, opts)
    return {
        **info,
        "quality": asdict(quality) if quality is not None else None,
        "write_seconds": write_seconds,
        "verify_seconds": verify_seconds,
    }


def _check_quality(tmp: Path, ckpt, info: dict, recipe, opts: ConvertOptions):
    """(quality report or None, seconds or None); writes the model card and mlxrun.json."""
    from mlxrun.convert.verify import verify_conversion, write_report

    quality = verify_seconds = None
    if opts.verify:
        _say(opts, "Checking quality against the source (--no-verify skips this)...")
        t0 = time.perf_counter()
        # With --calibrate, --calib is calibration data: the check keeps its held-out sample.
        held_out = None if opts.calibrate is not None else opts.calib
        quality = verify_conversion(ckpt.path, tmp, calib=held_out, quiet=opts.quiet)
        verify_seconds = time.perf_counter() - t0
    write_report(tmp, info, quality)  # the model card, with "not measured" under --no-verify
    (tmp / "mlxrun.json").write_text(
        json.dumps(
            {
                **info,
                "recipe_name": recipe.name if recipe else None,
                "group_size": recipe.group_size if recipe else None,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
            indent=2,
        )  # fmt: skip
    )
    return quality, verify_seconds


def _calibrate(tmp: Path, ckpt, qmap, dtype, cast_pred, recipe, opts: ConvertOptions):
    """(calibration facts, calibrated tensors by name) for --calibrate METHOD, else (None, None)."""
    if recipe is None or opts.calibrate is None:
        return None, None
    from mlxrun.convert.calibrate import load_overrides
    from mlxrun.convert.calibrated import calibration_info, run_calibration

    _say(opts, f"Calibrating ({opts.calibrate}), one layer at a time...")
    result, scratch = run_calibration(ckpt, qmap, dtype, cast_pred, tmp, opts)
    _say(opts, f"Calibrated {result.layers} layers on {result.tokens} tokens of {result.data} "
               f"in {result.seconds:.1f}s")  # fmt: skip
    return calibration_info(result), load_overrides(scratch)


def _calibration_facts(calibration: dict | None, floored_qmap: dict) -> dict:
    from mlxrun.convert.recipes import MOE_FLOOR_BITS, is_moe_router_or_shared

    facts: dict = {}
    if calibration is not None:
        facts["calibration"] = calibration
    kept = sorted(p for p in floored_qmap if is_moe_router_or_shared(p))
    if kept:
        facts["moe_kept"] = {"min_bits": MOE_FLOOR_BITS, "layers": len(kept)}
    return facts


def _convert_some(tmp: Path, ckpt, model, recipe, source: str, opts: ConvertOptions) -> dict:
    """One conversion, or for --calibrate auto / --max-kl the chosen one of several."""
    if recipe is None or (opts.calibrate != "auto" and opts.max_kl is None):
        return _convert_into(tmp, ckpt, model, recipe, source, opts)
    from dataclasses import replace

    from mlxrun.convert.calibrated import candidates, search
    from mlxrun.convert.verify import QualityReport, write_report

    def one(where: Path, c) -> dict:
        _say(opts, f"Trying {c.label}...")
        sub = replace(opts, calibrate=c.method)
        return _convert_into(where, ckpt, model, c.recipe, source, sub)

    result, tried = search(tmp, opts, candidates(model, ckpt.config, opts, recipe), one)
    result = {**result, "tried": tried}
    skip = ("quality", "write_seconds", "verify_seconds")
    write_report(tmp, {k: v for k, v in result.items() if k not in skip},
                 QualityReport(**result["quality"]))  # fmt: skip
    return result


def plan_for(source: str, *, fit: str | None = None, context: int | None = None,
             bits: int | None = None, group_size: int | None = None, recipe: str | None = None,
             revision: str | None = None, hosts: int = 1) -> str:  # fmt: skip
    """The `--plan` table. Needs only config.json: shapes come from the lazily built model."""
    from mlxrun.convert.checkpoint import load_config
    from mlxrun.convert.plan import choose_plan, estimate, format_plan_table
    from mlxrun.errors import parse_size
    from mlxrun.hub import resolve_source
    from mlxrun.memory import device_memory

    opts = ConvertOptions(fit=fit, context=context, bits=bits, group_size=group_size,
                          recipe=recipe, revision=revision, hosts=hosts)  # fmt: skip
    check_conflicts(opts, plan_only=True)
    src = resolve_source(source, revision=revision, allow_patterns=["config.json"], progress=False)
    config = load_config(Path(src))
    model = build_model(config)
    budget = device_memory().budget_bytes if fit in (None, "auto") else parse_size(fit)
    context = plan_context(config, context)
    if fit:
        plan = choose_plan(model, config, budget, context, group_size=opts.group_size_or_default,
                           hosts=hosts)  # fmt: skip
    else:
        chosen = get_recipe(recipe, bits=opts.bits_or_default,
                            group_size=opts.group_size_or_default)  # fmt: skip
        plan = estimate(model, config, chosen, context, budget_bytes=budget, hosts=hosts)
    return format_plan_table(plan)
