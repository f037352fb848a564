"""GPTQ-style error-compensating rounding, one layer at a time (Frantar et al., 2022).

Each linear's inputs over the calibration set give H = Σ xᵀx. Columns are rounded in order; the
rounding error of a column, weighted by the inverse Hessian, is pushed onto the columns not yet
rounded, so the layer's output error (not the weight error) is what gets minimised. Group scales
and biases are MLX's own affine ones (mx.quantize on the group as it stands when reached), rounded
to the output dtype before the codes are chosen, and the codes are packed exactly as mx.quantize
packs them, so mlx-lm reads the result as any other affine-quantized layer.

mlx-lm's `mlx_lm.quant.gptq` holds the whole model and packs only 2/4/8 bits; this runs on the one
layer the calibration pass holds and packs every width the recipes use. The column loop runs in
NumPy: thousands of tiny vector updates, cheaper there than as MLX graph evaluations.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlxrun.convert.calibrate import LayerContext, submodule, swap_modules

DAMP = 0.01  # fraction of the mean Hessian diagonal added for a stable inverse


def pack_codes(q: np.ndarray, bits: int) -> mx.array:
    """(rows, cols) integer codes -> (rows, cols * bits / 32) uint32, MLX's affine layout: each
    row's codes as one little-endian bit stream (32 codes fill `bits` words)."""
    rows, cols = q.shape
    q = q.astype(np.uint64).reshape(rows, cols // 32, 32)
    out = np.zeros((rows, cols // 32, bits), dtype=np.uint64)
    for j in range(32):
        word, shift = divmod(j * bits, 32)
        v = q[..., j] << np.uint64(shift)
        out[..., word] |= v & np.uint64(0xFFFFFFFF)
        if shift + bits > 32:  # 3-, 5- and 6-bit codes straddle two words
            out[..., word + 1] |= v >> np.uint64(32)
    return mx.array(out.astype(np.uint32).reshape(rows, -1))


def _inverse_hessian_factor(h: np.ndarray) -> np.ndarray:
    """Upper Cholesky factor of H⁻¹ (damped): row k holds the update weights for column k."""
    h = h.copy()
    dead = np.diag(h) == 0  # an input that was always zero: its column cannot matter
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += DAMP * np.mean(np.diag(h))
    inv = np.linalg.inv(np.linalg.cholesky(h).astype(np.float64))
    return np.linalg.cholesky(inv.T @ inv).T


def gptq_quantize(w: np.ndarray, h: np.ndarray, bits: int, group_size: int, dtype: mx.Dtype):
    """(out, in) float weight and (in, in) Hessian -> (packed weight, scales, biases) in `dtype`."""
    w = w.astype(np.float64).copy()
    u = _inverse_hessian_factor(h)
    n_bins = 2**bits - 1
    codes = np.zeros(w.shape, dtype=np.uint32)
    all_s, all_b = [], []
    for i in range(0, w.shape[1], group_size):
        j = i + group_size
        _, s, b = mx.quantize(mx.array(w[:, i:j].astype(np.float32)), group_size=group_size,
                              bits=bits)  # fmt: skip
        s, b = s.astype(dtype), b.astype(dtype)  # the values the file will hold
        all_s.append(s)
        all_b.append(b)
        s64 = np.array(s.astype(mx.float32), dtype=np.float64)[:, 0]
        b64 = np.array(b.astype(mx.float32), dtype=np.float64)[:, 0]
        err = np.zeros((w.shape[0], group_size))
        for k in range(i, j):
            q = np.clip(np.round((w[:, k] - b64) / s64), 0, n_bins)
            codes[:, k] = q
            e = (w[:, k] - (s64 * q + b64)) / u[k, k]
            w[:, k + 1 : j] -= np.outer(e, u[k, k + 1 : j])
            err[:, k - i] = e
        w[:, j:] -= err @ u[i:j, j:]
    return pack_codes(codes, bits), mx.concatenate(all_s, 1), mx.concatenate(all_b, 1)


class _Hessian(nn.Module):
    """Stands in for a linear while the layer runs: sums xᵀx of its inputs."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.h = None

    def __call__(self, x):
        xf = x.reshape(-1, x.shape[-1]).astype(mx.float32)
        h = xf.T @ xf
        self.h = h if self.h is None else self.h + h  # evaluated with the layer's output
        return self.inner(x)


def hessians(ctx: LayerContext) -> dict[str, np.ndarray]:
    """H for every plain linear the recipe quantizes (MoE experts are left to plain rounding:
    their inputs are routed per token, which this pass does not split)."""
    hooks = {}
    for rel, module in ctx.layer.named_modules():
        if rel in ctx.params and type(module) is nn.Linear:
            hooks[rel] = _Hessian(module)
    swap_modules(ctx.layer, hooks)
    try:
        for x in ctx.inputs:
            mx.eval(ctx.run(ctx.layer, x), [hook.h for hook in hooks.values()])
    finally:
        swap_modules(ctx.layer, {rel: hook.inner for rel, hook in hooks.items()})
    return {rel: np.array(hook.h, dtype=np.float64) for rel, hook in hooks.items()}


def gptq_layer(ctx: LayerContext) -> dict[str, mx.array]:
    out: dict[str, mx.array] = {}
    for rel, h in hessians(ctx).items():
        p = ctx.params[rel]
        module = submodule(ctx.layer, rel)
        w = np.array(module.weight.astype(ctx.out_dtype(f"{rel}.weight")).astype(mx.float32))
        wq, s, b = gptq_quantize(w, h, p.bits, p.group_size, ctx.out_dtype(f"{rel}.weight"))
        out.update({f"{rel}.weight": wq, f"{rel}.scales": s, f"{rel}.biases": b})
    return out
