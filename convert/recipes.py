"""Quantization recipes: which layer gets how many bits.

A recipe is a pure rule on a layer's path. `quantization_map` applies it to a model instance (built
lazily, so no weights are touched) and is the single decision used by the quantizer, the planner and
the config writer, so the three can never disagree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mlxrun.errors import InvalidRequestError

if TYPE_CHECKING:
    from mlxrun.models import ModelProtocol

VALID_BITS = (2, 3, 4, 5, 6, 8)
VALID_GROUP_SIZES = (32, 64, 128)
MODE = "affine"

_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class QuantParams:
    bits: int
    group_size: int

    def as_config(self) -> dict[str, Any]:
        return {"group_size": self.group_size, "bits": self.bits, "mode": MODE}


@dataclass(frozen=True)
class Recipe:
    """`bits` everywhere, except `high_bits` on the sensitive layers (None: uniform)."""

    name: str
    bits: int
    group_size: int = 64
    high_bits: int | None = None

    def __post_init__(self) -> None:
        for b in (self.bits, self.high_bits):
            if b is not None and b not in VALID_BITS:
                raise InvalidRequestError(
                    f"bits must be one of {', '.join(map(str, VALID_BITS))}, got {b}", param="bits"
                )
        if self.group_size not in VALID_GROUP_SIZES:
            raise InvalidRequestError(
                f"group size must be one of {', '.join(map(str, VALID_GROUP_SIZES))}, "
                f"got {self.group_size}",
                param="group_size",
            )

    def params_for(self, path: str, num_layers: int) -> QuantParams:
        if self.high_bits is not None and _is_sensitive(path, num_layers):
            return QuantParams(self.high_bits, self.group_size)
        return QuantParams(self.bits, self.group_size)

    @property
    def label(self) -> str:
        if self.high_bits is None:
            return f"{self.bits}-bit g{self.group_size}"
        return f"{self.name} g{self.group_size}"


def _is_sensitive(path: str, num_layers: int) -> bool:
    """Embeddings, lm_head, and attention-v / MLP-down in the first and last eighth plus every third
    layer between: the layers whose error hurts perplexity most (the Q4_K_M heuristic)."""
    if path.endswith("lm_head") or "embed_tokens" in path or path.endswith("wte"):
        return True
    m = _LAYER_RE.search(f".{path}.")
    if m is None:
        return False
    i = int(m.group(1))
    eighth = num_layers // 8
    more = i < eighth or i >= 7 * num_layers // 8 or (i - eighth) % 3 == 2
    return more and ("v_proj" in path or "down_proj" in path or ".w2" in path)


# Named mixed-precision recipes: low bits almost everywhere, high bits on sensitive layers.
MIXED = {
    "mixed_2_6": (2, 6),
    "mixed_3_4": (3, 4),
    "mixed_3_6": (3, 6),
    "mixed_4_6": (4, 6),
    "mixed_4_8": (4, 8),
    "mixed_6_8": (6, 8),
}

# Best quality first; the planner walks it until something fits.
QUALITY_LADDER = (
    "q8", "mixed_6_8", "q6", "q5", "mixed_4_8", "mixed_4_6", "q4",
    "mixed_3_6", "mixed_3_4", "q3", "mixed_2_6", "q2",
)  # fmt: skip


def recipe_names() -> list[str]:
    return [f"q{b}" for b in VALID_BITS] + list(MIXED)


def get_recipe(name: str | None = None, *, bits: int = 4, group_size: int = 64) -> Recipe:
    """A recipe by name ("q4", "mixed_4_6", …); with no name, uniform `bits`."""
    if name is None:
        return Recipe(f"q{bits}", bits, group_size)
    if name in MIXED:
        low, high = MIXED[name]
        return Recipe(name, low, group_size, high)
    if re.fullmatch(r"q\d", name) and int(name[1:]) in VALID_BITS:
        return Recipe(name, int(name[1:]), group_size)
    raise InvalidRequestError(
        f"unknown recipe {name!r}; choose from {', '.join(recipe_names())}", param="recipe"
    )


# MoE routers and shared experts: every token passes through them, and a router's small error
# flips which experts run. Calibrated conversions keep them at 8 bits or more.
MOE_FLOOR_BITS = 8
_MOE_KEEP_RE = re.compile(r"(^|\.)(gate|router|shared_experts?|shared_expert_gate)(\.|$)")


def is_moe_router_or_shared(path: str) -> bool:
    """A router (`mlp.gate`, `block_sparse_moe.gate`, `router`) or a shared expert's linear;
    not a dense MLP's `gate_proj`."""
    return _MOE_KEEP_RE.search(path) is not None


def quantization_map(
    model: ModelProtocol, recipe: Recipe, *, moe_floor: bool = False
) -> dict[str, QuantParams]:
    """Module path -> params, for every layer this recipe quantizes in `model`.

    A layer is quantized when it can be (`to_quantized`), its input dim divides the group size,
    and the architecture's own `quant_predicate` (e.g. MoE routers kept in full precision) agrees.
    With `moe_floor`, routers and shared experts get at least MOE_FLOOR_BITS. (Plain conversions
    stay byte-identical to mlx_lm.convert, which quantizes e.g. Mixtral's router at the recipe's
    bits.)
    """
    num_layers = len(getattr(model, "layers", []) or [])
    model_pred = getattr(model, "quant_predicate", None)
    out: dict[str, QuantParams] = {}
    for path, module in model.named_modules():
        if not hasattr(module, "to_quantized") or not hasattr(module, "weight"):
            continue
        params = recipe.params_for(path, num_layers)
        if module.weight.shape[-1] % params.group_size != 0:
            continue
        if model_pred is not None:
            verdict = model_pred(path, module)
            if verdict is False:
                continue
            if isinstance(verdict, dict):
                params = QuantParams(verdict.get("bits", params.bits),
                                     verdict.get("group_size", params.group_size))  # fmt: skip
        if moe_floor and params.bits < MOE_FLOOR_BITS and is_moe_router_or_shared(path):
            params = QuantParams(MOE_FLOOR_BITS, params.group_size)
        out[path] = params
    return out


def config_section(recipe: Recipe, qmap: dict[str, QuantParams]) -> dict[str, Any]:
    """The config.json `quantization` block as mlx-lm writes it: defaults plus per-layer overrides."""
    default = QuantParams(recipe.bits, recipe.group_size)
    section: dict[str, Any] = default.as_config()
    for path, params in sorted(qmap.items()):
        if params != default:
            section[path] = params.as_config()
    return section
