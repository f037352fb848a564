"""AWQ-style activation-aware scaling and clipping, one layer at a time (Lin et al., 2023).

Input channels that carry large activations matter most; scaling them up in the weight (and down in
the op before, a norm or the preceding projection, which stays exact) gives them more of the
quantization grid. The scale per channel group is searched on a grid against the layer's real
output; then each weight group's clipping range is searched the same way. Both only change float
values, which the recipe then quantizes as usual: the output has the recipe's exact bytes.

The search itself is mlx-lm's (`mlx_lm.quant.awq`: scale_block, search_best_clip); what it lacks
is the streaming: it holds the whole model and quantizes it uniformly. Here it runs on the one layer
the calibration pass holds, with each linear clipped for its own recipe bits, and a layer whose
output error does not drop is kept as it was.
"""

from __future__ import annotations

from collections import Counter
from typing import cast

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlxrun.convert.calibrate import LayerContext, submodule, swap_modules
from mlxrun.convert.recipes import QuantParams

N_GRID = 20
# Llama-style blocks (llama, mistral, qwen2/3, pycode…): the scale groups mlx-lm's AWQ uses.
_LLAMA_PARTS = ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip
_NO_CLIP = ("q_proj", "k_proj")  # their errors partly cancel in q·k; clipping them hurts


def _fake_quant(p: QuantParams, dtype: mx.Dtype):
    def f(w: mx.array) -> mx.array:
        w = w.astype(dtype)
        q = mx.quantize(w, group_size=p.group_size, bits=p.bits)
        return mx.dequantize(*q, group_size=p.group_size, bits=p.bits).astype(mx.float32)

    return f


def _has(layer: nn.Module, rel: str) -> bool:
    try:
        submodule(layer, rel)
    except (AttributeError, KeyError, IndexError, ValueError):
        return False
    return True


class _Feat(nn.Module):
    """Stands in for a linear while the float layer runs: keeps its whole input on it."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def __call__(self, x):
        feat = self.inner.get("input_feat")
        self.inner.input_feat = x if feat is None else mx.concatenate([feat, x], 0)
        return self.inner(x)


def _capture(ctx: LayerContext, x: mx.array) -> mx.array:
    """Run the float layer once, leaving each linear's input on it as `input_feat` (N, L, D)."""
    hooks = {rel: _Feat(m) for rel, m in ctx.layer.named_modules() if type(m) is nn.Linear}
    swap_modules(ctx.layer, hooks)
    try:
        y = ctx.run(ctx.layer, x)
        mx.eval(y, *[h.inner.input_feat for h in hooks.values() if "input_feat" in h.inner])
    finally:
        swap_modules(ctx.layer, {rel: h.inner for rel, h in hooks.items()})
    return y


def _output_error(ctx: LayerContext, x: mx.array, y: mx.array) -> float:
    """Mean squared error of the layer with its recipe linears fake-quantized."""
    saved = dict(tree_flatten(ctx.layer.parameters()))
    for rel, p in ctx.params.items():
        m = submodule(ctx.layer, rel)
        if type(m) is nn.Linear:
            m.weight = _fake_quant(p, ctx.out_dtype(f"{rel}.weight"))(m.weight)
    err = float(cast(float, mx.mean(mx.square(ctx.run(ctx.layer, x) - y)).item()))
    ctx.layer.load_weights(list(saved.items()))
    return err


def _search(ctx: LayerContext, x: mx.array) -> None:
    from mlx_lm.quant.awq import llama_awq, scale_block, search_best_clip

    common = Counter(ctx.params.values()).most_common(1)
    if not common:
        return
    base = common[0][0]
    if all(_has(ctx.layer, r) for r in _LLAMA_PARTS):
        mask = ctx.call_kwargs.get("mask", ctx.call_args[0] if ctx.call_args else None)
        scale_block(ctx.layer, llama_awq.scale_configs, _fake_quant(base, mx.float32),
                    {"mask": mask}, N_GRID)  # fmt: skip
    for rel, p in ctx.params.items():
        m = submodule(ctx.layer, rel)
        if type(m) is nn.Linear and "input_feat" in m and not rel.endswith(_NO_CLIP):
            m.weight = search_best_clip(m, _fake_quant(p, ctx.out_dtype(f"{rel}.weight")),
                                        p.group_size, N_GRID)  # fmt: skip


def awq_layer(ctx: LayerContext) -> dict[str, mx.array]:
    x = ctx.inputs.all()  # (N, L, D): the search needs the layer's whole input at once
    before = dict(tree_flatten(ctx.layer.parameters()))
    y = _capture(ctx, x)
    try:
        _search(ctx, x)
    finally:
        for _, m in ctx.layer.named_modules():
            m.pop("input_feat", None)
    after = dict(tree_flatten(ctx.layer.parameters()))
    changed = [k for k in after if not mx.array_equal(after[k], before[k]).item()]
    if not changed:
        return {}
    new_err = _output_error(ctx, x, y)
    ctx.layer.load_weights(list(before.items()))
    old_err = _output_error(ctx, x, y)
    ctx.notes.update(awq_error_before=old_err, awq_error_after=new_err)
    if new_err >= old_err:
        return {}  # the search did not help this layer: keep the source values
    ctx.layer.load_weights([(k, after[k]) for k in changed], strict=False)
    return {k: after[k].astype(ctx.out_dtype(k)) for k in changed}
