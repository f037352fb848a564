"""DWQ-style learned refinement, one layer at a time: distil the quantized layer toward the source.

mlx-lm's DWQ (`mlx_lm.quant.dwq`) keeps the quantized codes and trains the scales and biases of
every group so the quantized *model's* logits match the source's, which needs the whole model
resident with its gradients. Here the same parameters are trained per layer against the source's
own output of that layer (the float stream the calibration pass carries beside the quantized one),
with the quantized stream as input, so a layer also learns to undo what the layers before it lost.
Memory stays one layer plus two activation streams.

The scales and biases are trained as relative offsets (s·(1+a), b + s·c), so one learning rate
suits every group whatever its magnitude; the result is rounded to the output dtype like any scale.
A layer whose output error does not drop keeps its plain rounding.
"""

from __future__ import annotations

from typing import cast

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from mlxrun.convert.calibrate import LayerContext, quantized_copy

EPOCHS = 4
LEARNING_RATE = 1e-3


def _trainable(layer: nn.Module, ctx: LayerContext) -> dict[str, nn.Module]:
    # 8-bit layers (MoE routers) are already close; experts' gathered matmuls are left as rounded.
    return {
        rel: m
        for rel, m in layer.named_modules()
        if rel in ctx.params and isinstance(m, nn.QuantizedLinear) and m.bits < 8
    }


def _mean_loss(ctx: LayerContext, layer: nn.Module) -> float:
    total = n = 0.0
    assert ctx.targets is not None  # DWQ runs with the source's own outputs
    for x, y in zip(ctx.inputs, ctx.targets, strict=True):
        total += float(cast(float, mx.sum(mx.square(ctx.run(layer, x) - y)).item()))
        n += y.size
    return total / max(n, 1.0)


def dwq_layer(ctx: LayerContext) -> dict[str, mx.array]:
    assert ctx.targets is not None, "DWQ needs the source layer's outputs"
    layer = quantized_copy(ctx.layer, ctx.params, {}, ctx.out_dtype)
    mods = _trainable(layer, ctx)
    if not mods:
        return {}
    init = {rel: (m.scales, m.biases) for rel, m in mods.items()}
    zero = {rel: {"a": mx.zeros_like(s), "c": mx.zeros_like(b)} for rel, (s, b) in init.items()}

    def set_offsets(d: dict) -> None:
        for rel, m in mods.items():
            s, b = init[rel]
            m.scales = s * (1 + d[rel]["a"])
            m.biases = b + s * d[rel]["c"]

    def loss_fn(d: dict, x: mx.array, y: mx.array) -> mx.array:
        set_offsets(d)
        return mx.mean(mx.square(ctx.run(layer, x) - y))

    before = _mean_loss(ctx, layer)
    opt = optim.Adam(learning_rate=LEARNING_RATE)
    step = mx.value_and_grad(loss_fn)
    d = zero
    for _ in range(EPOCHS):
        for x, y in zip(ctx.inputs, ctx.targets, strict=True):
            _, grads = step(d, x, y)
            d = opt.apply_gradients(grads, d)
            mx.eval(d, opt.state)
    set_offsets(d)
    after = _mean_loss(ctx, layer)
    ctx.notes.update(dwq_error_before=before, dwq_error_after=after)
    if not after < before:
        set_offsets(zero)
    out: dict[str, mx.array] = {}
    for rel, m in mods.items():
        dt = ctx.out_dtype(f"{rel}.weight")
        out.update({f"{rel}.weight": m.weight, f"{rel}.scales": m.scales.astype(dt),
                    f"{rel}.biases": m.biases.astype(dt)})  # fmt: skip
    return out
