"""Quality report of a conversion: how far the converted model is from its source.

End to end when both fit in memory (one after the other): run the source at its own precision over
calibration text, keep its log-probs, free it, run the converted model and compare (KL divergence,
top-1 agreement, perplexity ratio). Otherwise a per-tensor summary: each quantized weight is
dequantized and compared with its source tensor, one tensor resident at a time.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import mlx.core as mx

from mlxrun.errors import InvalidRequestError, UnsupportedModelError, format_size

if TYPE_CHECKING:
    from mlxrun.models import ModelProtocol

METHODS = ("auto", "end-to-end", "per-tensor")
DEFAULT_MAX_TOKENS = 256
MIN_CALIB_TOKENS = 64  # fewer and one token more or less moves top-1 agreement by whole percents
_WORST = 3
_STEP_TOKENS = 32  # tokens per evaluation in the end-to-end run
_CHUNK_ELEMENTS = 1 << 24  # per-tensor error in blocks of 16M elements (64 MB as float32)


@dataclass(frozen=True)
class QualityReport:
    """What was measured; fields that do not apply to `method` are None."""

    method: str  # "end-to-end" | "per-tensor"
    tokens: int = 0  # calibration tokens run through both models
    calib: str | None = None  # "built-in" or the --calib file name
    kl_divergence: float | None = None  # mean KL(source || converted) per token, nats
    top1_agreement: float | None = None  # fraction of positions with the same argmax
    ppl_source: float | None = None
    ppl_converted: float | None = None
    ppl_ratio: float | None = None  # converted / source; 1.0 is lossless
    tensors: int | None = None  # tensors compared (per-tensor)
    mean_rel_error: float | None = None  # mean over tensors of |W' - W|_F / |W|_F
    max_rel_error: float | None = None
    worst_tensors: tuple[str, ...] | None = None  # highest relative error first
    reason: str | None = None  # why per-tensor was done

    def summary(self) -> str:
        """The one progress line printed after verifying."""
        from mlxrun.convert.card import quality_summary

        return quality_summary(asdict(self))


def read_calib(path: str | Path | None) -> tuple[str, str]:
    """(text, label) of the calibration text: the built-in sample, or a UTF-8 text file."""
    if path is None:
        from mlxrun.convert.calib import SAMPLE_TEXT

        return SAMPLE_TEXT, "built-in"
    p = Path(path).expanduser()
    # Not is_file(): a pipe (`--calib /dev/stdin`, `<(zcat notes.gz)`) is fine text too.
    if p.is_dir() or not p.exists():
        what = "is a directory" if p.is_dir() else "does not exist"
        raise InvalidRequestError(f"calibration file {path} {what}", param="calib")
    from mlxrun.convert.calib_data import read_text_file

    text = read_text_file(p)
    if not text.strip():
        raise InvalidRequestError(f"calibration file {path} is empty", param="calib")
    return text, p.name


def verify_conversion(
    source_dir: str | Path,
    converted_dir: str | Path,
    *,
    calib: str | Path | None = None,
    quiet: bool = False,
    method: str = "auto",
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> QualityReport:
    """Compare the converted model in `converted_dir` with its source checkpoint in `source_dir`."""
    if method not in METHODS:
        raise InvalidRequestError(
            f"method must be one of {', '.join(METHODS)}, got {method!r}", param="method"
        )
    if max_tokens < 2:
        raise InvalidRequestError("max_tokens must be at least 2", param="max_tokens")
    source_dir, converted_dir = Path(source_dir), Path(converted_dir)
    text, label = read_calib(calib)
    auto = method == "auto"
    reason = "requested" if method == "per-tensor" else None
    if auto:
        reason = _too_big_reason(source_dir, converted_dir, max_tokens)
        method = "per-tensor" if reason else "end-to-end"
    report = None
    if method == "end-to-end":
        try:
            report = _end_to_end(source_dir, converted_dir, text, label, max_tokens)
        except InvalidRequestError:
            raise
        except Exception as e:  # noqa: BLE001 (the report must not sink a finished conversion)
            if not auto:
                raise
            reason = f"the end-to-end run failed: {_first_line(e)}"
    if report is None:
        _free()
        report = _per_tensor(source_dir, converted_dir, reason)
    if not quiet:
        print(report.summary(), file=sys.stderr, flush=True)
    return report


def _first_line(e: Exception) -> str:
    text = (str(e).strip().splitlines() or [""])[0]
    text = text if len(text) <= 160 else text[:157] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# --- choosing the method ---------------------------------------------------------------------


def _weight_bytes(model_dir: Path) -> int:
    return sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))


def _too_big_reason(source_dir: Path, converted_dir: Path, max_tokens: int) -> str | None:
    """None when both models plus the logits fit the memory budget, else why not.

    Counted as if both models were resident although they run one after the other: MLX's
    buffer cache and lazily freed arrays make the sequential peak hard to bound any tighter.
    """
    from mlxrun.convert.checkpoint import open_checkpoint
    from mlxrun.memory import RUNTIME_MARGIN_BYTES, device_memory, runtime_margin_bytes, text_config

    ckpt = open_checkpoint(source_dir)
    vocab = text_config(ckpt.config).get("vocab_size")
    # Source log-probs kept, converted logits, log-probs and one temporary: four (T, V) float32.
    logits = 4 * max_tokens * (vocab if isinstance(vocab, int) else 0) * 4
    try:
        margin = runtime_margin_bytes(ckpt.config, max_tokens, dtype_bytes=4)
    except UnsupportedModelError:  # a config the KV sizing cannot read; the fixed part still holds
        margin = RUNTIME_MARGIN_BYTES
    need = ckpt.total_bytes + _weight_bytes(converted_dir) + logits + margin
    budget = device_memory().budget_bytes
    if need <= budget:
        return None
    return (
        f"an end-to-end run needs about {format_size(need)} for the source, the converted "
        f"model and the logits, over the {format_size(budget)} memory budget"
    )


# --- end to end ------------------------------------------------------------------------------


def _tokenize(source_dir: Path, text: str, max_tokens: int, label: str = "built-in") -> mx.array:
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(source_dir)
    ids = list(tokenizer.encode(text))[:max_tokens]
    # A handful of tokens says nothing (three tokens can agree "100%"): refuse rather than claim.
    need = min(MIN_CALIB_TOKENS, max_tokens)
    if len(ids) < need:
        raise InvalidRequestError(
            f"calibration file {label} is only {len(ids)} token(s) long; the quality check needs "
            f"at least {need} to mean anything",
            param="calib",
            hint="Use a longer text, or drop --calib for the built-in sample.",
        )
    return mx.array(ids, dtype=mx.int32)


def check_calib(source_dir: str | Path, calib: str | Path) -> None:
    """Refuse a calibration file that is unreadable or too short, before any conversion work."""
    text, _ = read_calib(calib)
    _tokenize(Path(source_dir), text, DEFAULT_MAX_TOKENS, str(calib))


def _log_probs(model: ModelProtocol, tokens: mx.array) -> mx.array:
    """(T, V) log-probs, a batch of tokens per evaluation over a KV cache: each step is short,
    so Ctrl-C is seen between steps instead of after one long forward pass."""
    from mlxrun.models import make_cache  # mlx-lm's make_prompt_cache

    cache = make_cache(model)
    parts = []
    for i in range(0, tokens.size, _STEP_TOKENS):
        logits = model(tokens[None, i : i + _STEP_TOKENS], cache=cache)[0].astype(mx.float32)
        part = logits - mx.logsumexp(logits, axis=-1, keepdims=True)  # (step, V)
        mx.eval(part)
        parts.append(part)
    return mx.concatenate(parts, axis=0)


def _source_log_probs(source_dir: Path, tokens: mx.array) -> mx.array:
    """The source at its own precision, read exactly as the converter read it."""
    from mlxrun.convert.checkpoint import open_checkpoint
    from mlxrun.convert.quantize import load_lazy
    from mlxrun.models import build_model

    ckpt = open_checkpoint(source_dir)
    model = build_model(ckpt.config)
    model.load_weights(list(load_lazy(ckpt, model).items()))
    model.eval()
    return _log_probs(model, tokens)


def _converted_log_probs(converted_dir: Path, tokens: mx.array) -> mx.array:
    # mlx-lm's own loader: the output promises to load there, so this checks that too.
    from mlx_lm.utils import load_model

    model, _ = load_model(converted_dir, lazy=True)
    return _log_probs(model, tokens)


def _free() -> None:
    # Models hold no reference cycles, so returning from their function freed them already;
    # this hands the freed buffers back instead of keeping them in MLX's cache.
    mx.clear_cache()


def _end_to_end(
    source_dir: Path, converted_dir: Path, text: str, label: str, max_tokens: int
) -> QualityReport:
    tokens = _tokenize(source_dir, text, max_tokens, label)
    ref = _source_log_probs(source_dir, tokens)  # (T, V); the source model is gone on return
    _free()
    out = _converted_log_probs(converted_dir, tokens)
    _free()
    if out.shape != ref.shape:
        raise ValueError(f"converted logits have shape {out.shape}, source {ref.shape}")
    kl = (mx.exp(ref) * (ref - out)).sum(axis=-1)  # (T,)
    top1 = (ref.argmax(axis=-1) == out.argmax(axis=-1)).astype(mx.float32)  # (T,)
    # Position t predicts token t + 1.
    targets = tokens[1:, None]
    nll_ref = -mx.take_along_axis(ref[:-1], targets, axis=-1).mean()
    nll_out = -mx.take_along_axis(out[:-1], targets, axis=-1).mean()
    mx.eval(kl, top1, nll_ref, nll_out)
    # item() of a real scalar array is a float (mlx types it as any scalar).
    ppl_ref, ppl_out = _exp(cast(float, nll_ref.item())), _exp(cast(float, nll_out.item()))
    kl_mean = cast(float, kl.mean().item())
    return QualityReport(
        method="end-to-end",
        tokens=int(tokens.size),
        calib=label,
        # Rounding can dip a hair below zero; a NaN (a broken model) must stay visible.
        kl_divergence=0.0 if kl_mean < 0 else kl_mean,
        top1_agreement=cast(float, top1.mean().item()),
        ppl_source=ppl_ref,
        ppl_converted=ppl_out,
        ppl_ratio=ppl_out / ppl_ref,
    )


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


# --- per tensor ------------------------------------------------------------------------------


def _converted_weights(converted_dir: Path) -> dict[str, mx.array]:
    weights: dict[str, mx.array] = {}
    for f in sorted(converted_dir.glob("*.safetensors")):
        weights.update(
            cast("dict[str, mx.array]", mx.load(str(f)))
        )  # lazy: a tensor is read when evaluated
    return weights


def _quant_params(config: dict) -> tuple[dict, dict]:
    """(defaults, per-layer overrides) from config.json's `quantization` section."""
    section = dict(config.get("quantization") or {})
    defaults = {k: section.pop(k) for k in ("group_size", "bits", "mode") if k in section}
    return defaults, section


def _as_rows(a: mx.array) -> mx.array:
    """(..., K) -> (N, K); quantization groups run along the last axis, so rows split cleanly."""
    return a.reshape(-1, a.shape[-1]) if a.ndim > 1 else a.reshape(1, -1)


def _pairs(converted: dict[str, mx.array], config: dict):
    """(name, shape, rows) for every tensor to compare; rows(i, j) gives rows i:j of the
    converted tensor (dequantized) as float32, so no whole-tensor float32 copy is ever made.

    Tensors are popped from `converted`: an evaluated array that is still referenced keeps its
    data, so holding them would grow memory to the whole model.
    """
    defaults, overrides = _quant_params(config)
    quantized = sorted(n[: -len(".scales")] for n in converted if n.endswith(".scales"))
    if not quantized:
        # Nothing quantized (a layout/dtype conversion): compare every float tensor.
        for name in sorted(converted):
            if mx.issubdtype(converted[name].dtype, mx.floating):
                t = converted.pop(name)
                yield name, tuple(t.shape), _float_rows(_as_rows(t))
        return
    for path in quantized:
        p = {**defaults, **(overrides.get(path) or {})}
        w = converted.pop(f"{path}.weight")
        scales, biases = converted.pop(f"{path}.scales"), converted.pop(f"{path}.biases", None)
        bits = int(p.get("bits", 4))
        shape = (*w.shape[:-1], w.shape[-1] * 32 // bits)
        yield f"{path}.weight", shape, _dequantized_rows(w, scales, biases, p, bits)


def _float_rows(t: mx.array):
    return lambda i, j: t[i:j].astype(mx.float32)


def _dequantized_rows(w: mx.array, scales: mx.array, biases: mx.array | None, p: dict, bits: int):
    w, scales = _as_rows(w), _as_rows(scales)
    biases = _as_rows(biases) if biases is not None else None

    def rows(i: int, j: int) -> mx.array:
        return mx.dequantize(
            w[i:j],
            scales[i:j],
            biases[i:j] if biases is not None else None,
            group_size=int(p.get("group_size", 64)),
            bits=bits,
            mode=p.get("mode", "affine"),
        ).astype(mx.float32)

    return rows


def _relative_error(name: str, shape: tuple, rows, ref: mx.array) -> float:
    """|W' - W|_F / |W|_F, a block of rows at a time (bounded temporaries for huge embeddings)."""
    if shape != tuple(ref.shape):
        raise ValueError(
            f"{name} has shape {shape} in the converted model but {tuple(ref.shape)} "
            "in the source: the two directories are not the same model"
        )
    ref = _as_rows(ref)
    step = max(1, _CHUNK_ELEMENTS // ref.shape[1])
    num = den = 0.0
    for i in range(0, ref.shape[0], step):
        r = ref[i : i + step].astype(mx.float32)
        d2, r2 = mx.square(rows(i, i + step) - r).sum(), mx.square(r).sum()
        mx.eval(d2, r2)
        num, den = num + cast(float, d2.item()), den + cast(float, r2.item())
    return math.sqrt(num) / max(math.sqrt(den), 1e-30)


def _per_tensor(source_dir: Path, converted_dir: Path, reason: str | None) -> QualityReport:
    from mlxrun.convert.checkpoint import open_checkpoint
    from mlxrun.convert.quantize import load_lazy
    from mlxrun.models import build_model

    ckpt = open_checkpoint(source_dir)
    source = load_lazy(ckpt, build_model(ckpt.config))
    config = json.loads((converted_dir / "config.json").read_text())
    converted = _converted_weights(converted_dir)
    errors: dict[str, float] = {}
    for name, shape, rows in _pairs(converted, config):
        ref = source.pop(name, None)  # popped for the same reason as in _pairs
        if ref is not None:
            errors[name] = _relative_error(name, shape, rows, ref)  # evaluates this pair only
        del rows, ref
        mx.clear_cache()
    if not errors:
        raise ValueError(f"no tensor of {converted_dir} matches a source tensor")
    worst = sorted(errors, key=errors.__getitem__, reverse=True)[:_WORST]
    return QualityReport(
        method="per-tensor",
        tensors=len(errors),
        mean_rel_error=sum(errors.values()) / len(errors),
        max_rel_error=errors[worst[0]],
        worst_tensors=tuple(worst),
        reason=reason,
    )


# --- report files ----------------------------------------------------------------------------


def _finite(obj):
    """JSON has no NaN or infinity: such values (a broken model) are written as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_report(out_dir: str | Path, info: dict, quality: QualityReport | None) -> None:
    """Write README.md (model card) and, when quality was measured, quality.json into `out_dir`."""
    from mlxrun.convert.card import render_card

    out_dir = Path(out_dir)
    if quality is not None:
        data = {**info, "quality": asdict(quality)}
        text = json.dumps(_finite(data), indent=2, default=str, allow_nan=False)
        (out_dir / "quality.json").write_text(text + "\n", encoding="utf-8")
    (out_dir / "README.md").write_text(render_card(out_dir, info, quality), encoding="utf-8")
