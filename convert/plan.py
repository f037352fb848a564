"""Memory-fit planner: which recipe fits a memory budget at a given context length.

Byte math comes from the lazily built model's parameter shapes (nothing is evaluated) and from
`quantization_map`, the same per-layer decision the quantizer applies, so the plan and the
converted weights agree to the byte.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from mlx.utils import tree_flatten

from mlxrun.convert.recipes import QUALITY_LADDER, QuantParams, Recipe, get_recipe, quantization_map
from mlxrun.errors import InsufficientMemoryError, format_size
from mlxrun.memory import device_memory, kv_cache_bytes, runtime_margin_bytes

if TYPE_CHECKING:
    import mlx.core as mx

    from mlxrun.models import ModelProtocol

COMPONENTS = ("embeddings", "attention", "mlp", "experts", "lm_head", "norms/other")
# What tensor parallel splits across hosts (mlx-lm's shard()); the rest every host holds whole.
SPLIT_COMPONENTS = frozenset({"attention", "mlp", "experts"})


@dataclass(frozen=True)
class ComponentRow:
    name: str
    params: int
    nbytes: int

    @property
    def bits_per_weight(self) -> float:
        return self.nbytes * 8 / self.params if self.params else 0.0


@dataclass(frozen=True)
class ConvertPlan:
    recipe: Recipe | None  # None: weights kept in the float dtype
    context: int
    weights_bytes: int
    kv_bytes: int
    margin_bytes: int
    total_bytes: int
    budget_bytes: int
    bits_per_weight: float
    components: tuple[ComponentRow, ...]
    fits: bool
    dtype_bytes: int = 2
    hosts: int = 1  # > 1: every figure is one host's share under tensor parallel

    @property
    def label(self) -> str:
        return self.recipe.label if self.recipe else f"unquantized ({8 * self.dtype_bytes}-bit)"

    @property
    def spare_bytes(self) -> int:
        return self.budget_bytes - self.total_bytes


# (module path, parameter name, number of elements) for every parameter of the model.
_Params = list[tuple[str, str, int]]


def _parameters(model: ModelProtocol) -> _Params:
    out = []
    # tree_flatten without a destination returns a list (mlx types it as list or dict).
    for path, arr in cast("list[tuple[str, mx.array]]", tree_flatten(model.parameters())):
        module, _, name = path.rpartition(".")
        out.append((module, name, int(arr.size)))
    return out


def component_of(module_path: str) -> str:
    """Which table row a module's parameters count under."""
    parts = module_path.split(".")
    leaf = parts[-1] if parts else ""
    if leaf == "lm_head":
        return "lm_head"
    if any("embed" in p for p in parts) or leaf in ("wte", "wpe"):
        return "embeddings"
    if "norm" in leaf or leaf.startswith("ln"):
        return "norms/other"
    if any(p in ("switch_mlp", "experts") for p in parts):
        return "experts"
    if any(p in ("self_attn", "attention", "attn", "cross_attn") for p in parts):
        return "attention"
    if any(p in ("mlp", "feed_forward", "ffn", "block_sparse_moe", "moe") for p in parts):
        return "mlp"
    return "norms/other"


def parameter_bytes(numel: int, params: QuantParams | None, dtype_bytes: int) -> int:
    """Stored bytes of one weight: packed `bits` per element plus one scale and one bias (in the
    float dtype) per group when quantized (mlx affine mode); numel × dtype_bytes otherwise."""
    if params is None:
        return numel * dtype_bytes
    return numel * params.bits // 8 + 2 * (numel // params.group_size) * dtype_bytes


def _weights(
    params: _Params, qmap: dict[str, QuantParams], dtype_bytes: int, hosts: int = 1
) -> tuple[ComponentRow, ...]:
    counts = {c: [0, 0] for c in COMPONENTS}
    for module, name, numel in params:
        q = qmap.get(module) if name == "weight" else None
        row = counts[component_of(module)]
        row[0] += numel
        row[1] += parameter_bytes(numel, q, dtype_bytes)
    return tuple(
        ComponentRow(c, -(-n // hosts), -(-b // hosts)) if c in SPLIT_COMPONENTS else
        ComponentRow(c, n, b)
        for c, (n, b) in counts.items() if n
    )  # fmt: skip


def _plan(
    params: _Params,
    model: ModelProtocol,
    config: dict[str, Any],
    recipe: Recipe | None,
    context: int,
    dtype_bytes: int,
    budget_bytes: int,
    hosts: int = 1,
) -> ConvertPlan:
    qmap = quantization_map(model, recipe) if recipe is not None else {}
    rows = _weights(params, qmap, dtype_bytes, hosts)
    weights = sum(r.nbytes for r in rows)
    n_params = sum(r.params for r in rows)
    kv = -(-kv_cache_bytes(config, context, dtype_bytes) // hosts)  # heads split too
    margin = runtime_margin_bytes(config, context, dtype_bytes)
    total = weights + kv + margin
    return ConvertPlan(
        recipe=recipe,
        context=context,
        weights_bytes=weights,
        kv_bytes=kv,
        margin_bytes=margin,
        total_bytes=total,
        budget_bytes=budget_bytes,
        bits_per_weight=weights * 8 / n_params if n_params else 0.0,
        components=rows,
        fits=total <= budget_bytes,
        dtype_bytes=dtype_bytes,
        hosts=hosts,
    )


def estimate(
    model: ModelProtocol,
    config: dict[str, Any],
    recipe: Recipe | None,
    context: int,
    dtype_bytes: int = 2,
    *,
    budget_bytes: int | None = None,
    hosts: int = 1,
) -> ConvertPlan:
    """The plan for one recipe (None: no quantization). `model` is built lazily from `config`
    and never evaluated. Without `budget_bytes`, this machine's budget (`device_memory()`).
    With `hosts` > 1, one host's share when the model is split across them."""
    if budget_bytes is None:
        budget_bytes = device_memory().budget_bytes
    return _plan(_parameters(model), model, config, recipe, context, dtype_bytes, budget_bytes,
                 hosts)  # fmt: skip


def choose_plan(
    model: ModelProtocol,
    config: dict[str, Any],
    budget_bytes: int,
    context: int,
    *,
    group_size: int = 64,
    dtype_bytes: int = 2,
    ladder: tuple[str, ...] = QUALITY_LADDER,
    hosts: int = 1,
) -> ConvertPlan:
    """The best-quality recipe on `ladder` whose weights + KV + margin fit `budget_bytes`.

    Raises InsufficientMemoryError (needed = the smallest plan's total) when none fits.
    """
    params = _parameters(model)
    tried = [
        _plan(params, model, config, get_recipe(n, group_size=group_size), context, dtype_bytes,
              budget_bytes, hosts)
        for n in ladder
    ]  # fmt: skip
    # More stored bits is the quality proxy; per model the ladder is not always in size order
    # (a big vocabulary makes mixed recipes heavier), so walk by size, ladder order breaking ties.
    for plan in sorted(tried, key=lambda p: -p.weights_bytes):
        if plan.fits:
            return plan
    smallest = min(tried, key=lambda p: p.total_bytes)
    missing = smallest.total_bytes - budget_bytes
    raise InsufficientMemoryError(
        f"no recipe fits the {format_size(budget_bytes)} budget at {context} tokens of context: "
        f"the smallest ({smallest.label}) needs {format_size(smallest.total_bytes)}, "
        f"{format_size(missing)} more than available (tried {', '.join(ladder)})",
        needed=smallest.total_bytes,
        available=budget_bytes,
        hint="Use a shorter --context, a smaller model, or a larger budget with --fit SIZE.",
    )


def format_plan_table(plan: ConvertPlan) -> str:
    """The table `mlxrun convert --plan` prints."""
    where = f", per rank, {plan.hosts} hosts (tensor parallel)" if plan.hosts > 1 else ""
    lines = [f"plan: {plan.label}, context {plan.context} tokens{where}", ""]
    lines.append(f"{'component':<24}{'params':>12}{'size':>12}{'bits/weight':>14}")
    for row in plan.components:
        lines.append(
            f"{row.name:<24}{_count(row.params):>12}{format_size(row.nbytes):>12}"
            f"{row.bits_per_weight:>14.2f}"
        )
    n_params = sum(r.params for r in plan.components)
    lines.append("-" * 62)
    lines.append(
        f"{'weights':<24}{_count(n_params):>12}{format_size(plan.weights_bytes):>12}"
        f"{plan.bits_per_weight:>14.2f}"
    )
    lines.append(f"{f'KV cache ({plan.context} tokens)':<36}{format_size(plan.kv_bytes):>12}")
    lines.append(f"{'runtime margin':<36}{format_size(plan.margin_bytes):>12}")
    lines.append(f"{'total':<36}{format_size(plan.total_bytes):>12}")
    lines.append(f"{'budget':<36}{format_size(plan.budget_bytes):>12}")
    lines.append("")
    if plan.fits:
        lines.append(f"verdict: fits ({format_size(plan.spare_bytes)} to spare)")
    else:
        lines.append(f"verdict: does not fit ({format_size(-plan.spare_bytes)} short)")
    return "\n".join(lines)


def _count(n: int) -> str:
    for unit, scale in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)
