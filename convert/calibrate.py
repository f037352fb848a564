"""Calibrated quantization in bounded memory: one transformer layer resident at a time.

The pass walks the layers in order. Layer i's source tensors are read (and only those), the method
(convert/awq.py, gptq.py, dwq.py) turns them into the values the recipe's bytes will hold, and the
results go to a scratch safetensors file. The layer is then run *quantized* over the calibration
activations to make layer i+1's inputs, so each layer is calibrated on the errors of the ones before
it, and freed. Resident at any time: one layer in float32, its quantized copy, and the activations
(which spill to disk past a budget). The writer then streams the recipe's tensors as usual, taking
a calibrated tensor from the scratch files wherever one exists: the output has exactly the recipe's
names, shapes and dtypes; calibration changes values, not sizes.

Scratch entries are either a float tensor (AWQ: scaled/clipped weights and the norms the scales
fold into; quantized later by the recipe like any other) or a ready `.weight`/`.scales`/`.biases`
triple (GPTQ, DWQ), already in the output dtype.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn

from mlxrun.convert.recipes import QuantParams
from mlxrun.errors import InvalidRequestError, UnsupportedModelError

METHODS = ("awq", "gptq", "dwq")
CHOICES = (*METHODS, "auto")
ACTIVATION_BUDGET = 512 << 20  # bytes of calibration activations kept in memory per stream
BATCH = 4  # calibration sequences per forward pass


class _Stop(Exception):
    """Raised by the last capture hook: nothing past the layers needs to run."""


class ActivationStore:
    """Batches of one layer's activations; past `budget` bytes they live in scratch files and are
    read back one batch at a time (a lazily loaded array is dropped again after use)."""

    def __init__(self, scratch: Path, name: str, budget: int):
        self.scratch, self.name, self.budget = scratch, name, budget
        self.items: list[mx.array | Path] = []
        self.resident = 0
        self.spilled = 0

    def append(self, a: mx.array) -> None:
        mx.eval(a)
        if self.resident + a.nbytes <= self.budget:
            self.items.append(a)
            self.resident += a.nbytes
            return
        path = self.scratch / f"{self.name}-{len(self.items):05d}.safetensors"
        mx.save_safetensors(str(path), {"x": a})
        self.items.append(path)
        self.spilled += 1

    def __iter__(self) -> Iterator[mx.array]:
        for item in self.items:
            yield item if isinstance(item, mx.array) else _load_x(item)

    def all(self) -> mx.array:
        """Every batch at once (AWQ's search needs the layer's whole input)."""
        return mx.concatenate(list(self), axis=0)

    def drop(self) -> None:
        for item in self.items:
            if isinstance(item, Path):
                item.unlink(missing_ok=True)
        self.items = []


def _load_x(path: Path) -> mx.array:
    loaded = cast("dict[str, mx.array]", mx.load(str(path)))
    return loaded["x"]


@dataclass
class LayerContext:
    """What a method sees of one layer; `layer` is evaluated in float32."""

    layer: nn.Module
    prefix: str  # the layer's module path, e.g. "model.layers.3"
    params: dict[str, QuantParams]  # relative module path -> the recipe's params, quantized linears
    inputs: ActivationStore  # the quantized stream: what this layer sees in the converted model
    call_args: tuple
    call_kwargs: dict
    out_dtype: Callable[[str], mx.Dtype]  # relative tensor name -> the dtype it is written in
    targets: ActivationStore | None = None  # the source's own outputs (DWQ), else None
    notes: dict = field(default_factory=dict)  # per-layer figures a method reports

    def run(self, module: nn.Module, x: mx.array) -> mx.array:
        return module(x, *self.call_args, **self.call_kwargs)


@dataclass(frozen=True)
class CalibrationResult:
    method: str
    data: str  # the calibration set's label
    sequences: int
    tokens: int
    layers: int
    seconds: float
    spilled_batches: int
    scratch: Path


def layer_list(model) -> tuple[list, str]:
    """The model's transformer block list (the real list, so it can be edited) and its path."""
    paths = {id(m): p for p, m in model.named_modules()}
    for holder in (getattr(model, "model", None), getattr(model, "language_model", None), model):
        layers = getattr(holder, "layers", None)
        if isinstance(layers, list) and layers and id(layers[0]) in paths:
            return layers, paths[id(layers[0])].rsplit(".", 1)[0]
    raise UnsupportedModelError(
        f"{type(model).__module__} has no transformer layer list to calibrate layer by layer"
    )


def _capture_inputs(config: dict, weights: dict, tokens: mx.array, store: ActivationStore):
    """Run the model up to its first layer (embeddings only are read) and record layer inputs
    and the per-layer call arguments (masks) the model's own forward builds."""
    from mlxrun.models import build_model

    model = build_model(config)
    layers, base = layer_list(model)
    outside = [(k, weights.pop(k)) for k in list(weights) if not k.startswith(base + ".")]
    model.load_weights(outside, strict=False)  # lazy: only what the forward touches is read
    calls: dict[int, tuple[tuple, dict]] = {}

    class Hook(nn.Module):
        def __init__(self, i: int, inner: nn.Module):
            super().__init__()
            self.i, self.inner = i, inner

        def __getattr__(self, key):  # the model's forward may read layer attributes
            try:
                return super().__getattr__(key)
            except AttributeError:
                if "inner" not in self:
                    raise
                return getattr(self["inner"], key)

        def __call__(self, x, *args, **kwargs):
            calls[self.i] = (args, kwargs)
            if self.i == 0:
                store.append(x.astype(mx.float32))
            if self.i == len(layers) - 1:
                raise _Stop
            return x

    for i in range(len(layers)):
        layers[i] = Hook(i, layers[i])
    for s in range(0, tokens.shape[0], BATCH):
        try:
            model(tokens[s : s + BATCH])
        except _Stop:
            pass
    return [calls[i] for i in range(len(layers))]


def _load_layer(layer: nn.Module, prefix: str, weights: dict) -> dict[str, mx.Dtype]:
    """Read this layer's source tensors into `layer` as float32; their source dtypes by name."""
    mine = [(k, weights.pop(k)) for k in [k for k in weights if k.startswith(prefix + ".")]]
    dtypes = {k[len(prefix) + 1 :]: v.dtype for k, v in mine}
    layer.load_weights([(k[len(prefix) + 1 :], v) for k, v in mine], strict=True)
    layer.set_dtype(mx.float32)
    mx.eval(layer.parameters())
    return dtypes


def quantized_copy(layer: nn.Module, params: dict[str, QuantParams], overrides: dict,
                   out_dtype: Callable[[str], mx.Dtype]) -> nn.Module:  # fmt: skip
    """`layer` as the converted model will hold it (modified in place): float overrides set, each
    recipe linear quantized from its output-dtype weight (or given its ready triple), scales
    rounded to the output dtype. One module at a time, so only one extra copy is ever resident."""
    floats = [
        (k, v.astype(mx.float32)) for k, v in overrides.items() if not _in_triple(k, overrides)
    ]
    if floats:
        layer.load_weights(floats, strict=False)
    for rel, module in list(layer.named_modules()):
        p = params.get(rel)
        if p is not None and "scales" in module and f"{rel}.scales" in overrides:
            _put_triple(module, rel, overrides)  # quantized already (DWQ trains it in place)
            continue
        if p is None or "scales" in module or not hasattr(module, "to_quantized"):
            continue
        dt = out_dtype(f"{rel}.weight")
        if f"{rel}.scales" not in overrides:
            module.weight = module.weight.astype(dt).astype(mx.float32)
        q = module.to_quantized(group_size=p.group_size, bits=p.bits)
        if f"{rel}.scales" in overrides:  # replaces the lazy rounding before it is computed
            _put_triple(q, rel, overrides)
        else:
            q.scales = q.scales.astype(dt).astype(mx.float32)
            q.biases = q.biases.astype(dt).astype(mx.float32)
        mx.eval(q.parameters())
        swap_modules(layer, {rel: q})
    return layer


def _put_triple(module: nn.Module, rel: str, overrides: dict) -> None:
    module.weight = overrides[f"{rel}.weight"]
    module.scales = overrides[f"{rel}.scales"].astype(mx.float32)  # as written, then widened
    module.biases = overrides[f"{rel}.biases"].astype(mx.float32)


def submodule(module, rel: str):
    """`module`'s descendant at dotted path `rel` (list children by index)."""
    for part in rel.split("."):
        module = module[int(part)] if isinstance(module, list) else getattr(module, part)
    return module


def swap_modules(layer: nn.Module, modules: Mapping[str, Any]) -> None:
    """Put each module at its dotted path under `layer` (hooks in, and the originals back)."""
    for rel, module in modules.items():
        head, _, leaf = rel.rpartition(".")
        parent = submodule(layer, head) if head else layer
        if isinstance(parent, list):
            parent[int(leaf)] = module
        else:
            setattr(parent, leaf, module)


def _in_triple(name: str, overrides: dict) -> bool:
    path, _, leaf = name.rpartition(".")
    return leaf in ("weight", "scales", "biases") and f"{path}.scales" in overrides


def _method(name: str) -> Callable[[LayerContext], dict[str, mx.array]]:
    if name == "gptq":
        from mlxrun.convert.gptq import gptq_layer

        return gptq_layer
    if name == "awq":
        from mlxrun.convert.awq import awq_layer

        return awq_layer
    if name == "dwq":
        from mlxrun.convert.dwq import dwq_layer

        return dwq_layer
    raise InvalidRequestError(
        f"calibration method must be one of {', '.join(CHOICES)}, got {name!r}", param="calibrate"
    )


def _run_all(ctx: LayerContext, module: nn.Module, src: ActivationStore, dst: ActivationStore):
    for x in src:
        dst.append(ctx.run(module, x))
    mx.clear_cache()


def calibrate(ckpt, qmap: dict[str, QuantParams], out_dtype: Callable[[str, mx.Dtype], mx.Dtype],
              tokens: mx.array, method: str, scratch: Path, data_label: str,
              budget: int | None = None) -> CalibrationResult:  # fmt: skip
    """Calibrate every layer of `ckpt` for `qmap`; results land in `scratch` (see load_overrides).

    `out_dtype(name, source_dtype)` is the dtype the writer gives tensor `name`.
    """
    from mlxrun.convert.quantize import load_lazy
    from mlxrun.models import build_model

    fn = _method(method)
    budget = ACTIVATION_BUDGET if budget is None else budget
    t0 = time.perf_counter()
    scratch.mkdir(parents=True, exist_ok=True)
    model = build_model(ckpt.config)
    layers, base = layer_list(model)
    weights = load_lazy(ckpt, model)
    x = ActivationStore(scratch, "x0", budget)
    calls = _capture_inputs(ckpt.config, weights, tokens, x)
    ref = x if method == "dwq" else None  # the source's own stream, for distillation targets
    spilled = x.spilled
    for i in range(len(layers)):
        prefix = f"{base}.{i}"
        layer = layers[i]
        src_dtypes = _load_layer(layer, prefix, weights)
        params = {p[len(prefix) + 1 :]: q for p, q in qmap.items() if p.startswith(prefix + ".")}

        def dtype_of(rel: str, _p=prefix, _d=src_dtypes) -> mx.Dtype:
            return out_dtype(f"{_p}.{rel}", _d.get(rel, mx.float32))

        call_args, call_kwargs = calls[i]
        ctx = LayerContext(layer, prefix, params, x, call_args, call_kwargs, out_dtype=dtype_of)
        if ref is not None:
            ctx.targets = ActivationStore(scratch, f"r{i + 1}", budget)
            _run_all(ctx, layer, ref, ctx.targets)  # the source layer on the source stream
        overrides = fn(ctx)
        if overrides:
            full = {f"{prefix}.{k}": v for k, v in overrides.items()}
            mx.save_safetensors(str(scratch / f"layer-{i:05d}.safetensors"), full)
        nxt = ActivationStore(scratch, f"x{i + 1}", budget)
        _run_all(ctx, quantized_copy(layer, params, overrides, dtype_of), x, nxt)
        spilled += nxt.spilled + (ctx.targets.spilled if ctx.targets is not None else 0)
        x.drop()
        if ref is not None:
            ref.drop()
            ref = ctx.targets
        x = nxt
        layers[i] = nn.Module()  # this layer's arrays are freed here
        del layer, ctx, overrides
        mx.clear_cache()
    x.drop()
    return CalibrationResult(method, data_label, int(tokens.shape[0]), int(tokens.size),
                             len(layers), time.perf_counter() - t0, spilled, scratch)  # fmt: skip


def load_overrides(scratch: Path) -> dict[str, mx.array]:
    """Calibrated tensors by output name, lazily (each is read when the writer evaluates it)."""
    out: dict[str, mx.array] = {}
    for f in sorted(scratch.glob("layer-*.safetensors")):
        out.update(cast("dict[str, mx.array]", mx.load(str(f))))
    return out
