"""Hub config.json -> the keys mlx-lm's model classes read, before any class sees it.

mlx-lm's ModelArgs read the names transformers 4.x wrote (`rope_theta`, `rope_scaling`,
`torch_dtype`, `num_experts`…) and fall back to their own defaults when a key is absent (a
key left out of config.json means transformers' default, which is not always mlx-lm's).
transformers 5 writes `rope_parameters` (flat, or one dict per layer type), `dtype`,
`layer_types` and some renamed keys instead, so a v5 checkpoint would load with the class's
default theta and no scaling: wrong logits past the first position, with no error.

`normalize` is the one door: it adds the legacy keys (never removes or rewrites what a 4.x
config already says, so legacy configs pass through unchanged), then checks that the class
honours every key that changes the math; what it would drop is an UnsupportedModelError
naming the key. `unhonoured_window` tells the loader the longest exact context when the
class ignores a sliding window.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import logging
import math
from types import ModuleType
from typing import Any

from mlxrun.errors import UnsupportedModelError
from mlxrun.models import model_classes

log = logging.getLogger(__name__)

# Keys transformers 5 stores under a new name, per model type: {stored name: mlx-lm field}.
# Derived from transformers' `attribute_map`s against mlx-lm's ModelArgs fields.
_RENAMED: dict[str, dict[str, str]] = {
    "qwen3_moe": {"num_local_experts": "num_experts"},
    "mellum": {"num_local_experts": "num_experts"},
    "exaone": {"num_hidden_layers": "num_layers", "rms_norm_eps": "layer_norm_epsilon"},
    "internlm3": {"attention_bias": "qkv_bias", "mlp_bias": "bias"},
    "bailing_hybrid": {
        "model_max_length": "max_position_embeddings",
        "moe_renormalize": "norm_topk_prob",
        "num_expert_group": "n_group",
        "num_experts_per_token": "num_experts_per_tok",
    },
    "step3p5": {
        "num_key_value_heads": "num_attention_groups",
        "n_routed_experts": "moe_num_experts",
        "num_experts_per_tok": "moe_top_k",
    },
}
# transformers' default for tie_word_embeddings where mlx-lm's ModelArgs default differs (or has
# none): a config that leaves the key out means transformers' default, not mlx-lm's. Derived
# from transformers' config classes against mlx-lm's ModelArgs.
_TIE_DEFAULTS: dict[str, bool] = {
    **dict.fromkeys(
        (
            "llama",
            "mistral",
            "qwen2",
            "qwen3",
            "qwen3_moe",
            "ministral3",
            "iquestcoder",
            "glm",
            "glm4_moe",
            "granite",
            "granitemoe",
            "granitemoehybrid",
            "olmo2",
            "olmoe",
            "olmo_hybrid",
            "exaone",
            "exaone4",
            "seed_oss",
            "bitnet",
            "falcon_h1",
            "jamba",
            "mamba2",
            "helium",
            "apertus",
            "mellum",
            "llama4_text",
            "solar_open",
        ),
        False,
    ),  # fmt: skip
    **dict.fromkeys(("ernie4_5", "ernie4_5_moe", "minicpm3"), True),
}
_ROPE_KEYS_OUTSIDE_SCALING = ("rope_theta", "partial_rotary_factor")
# transformers moves the pretraining length into the scaling dict for these types, from the
# top-level key when the config has one, else max_position_embeddings (mlx-lm's defaults differ).
_NEEDS_ORIGINAL_MAX = ("llama3", "yarn", "longrope")

# What mlx-lm's rope_utils.initialize_rope builds.
_INITIALIZE_ROPE_TYPES = frozenset(
    {"default", "linear", "dynamic", "llama3", "yarn", "longrope", "mrope", "proportional"}
)
# Classes that build their own RoPE: the types they apply (phi3 drops others with a print).
_OWN_ROPE_TYPES: dict[str, frozenset[str]] = {
    "phi3": frozenset({"default", "linear", "longrope", "su"}),
    # These declare a rope_scaling field but build a plain nn.RoPE from rope_theta.
    **dict.fromkeys(
        ("mixtral", "qwen3_moe", "glm4_moe", "kimi_linear", "solar_open"), frozenset({"default"})
    ),
}
# Scaling keys mlx-lm's RoPE classes never read: {rope type: {key: the value they assume}}.
_IGNORED_SCALING_KEYS: dict[str, dict[str, Any]] = {
    "yarn": {"attention_factor": None, "truncate": True},
    "longrope": {"attention_factor": None},
}


def rope_type(scaling: Any) -> str:
    """The RoPE variant a rope_scaling / rope_parameters dict names ("default" when none)."""
    if not isinstance(scaling, dict):
        return "default"
    return str(scaling.get("rope_type") or scaling.get("type") or "default")


def _is_per_layer(params: dict) -> bool:
    return bool(params) and all(isinstance(v, dict) or v is None for v in params.values())


def _apply_rope(out: dict, params: dict) -> None:
    """One flat rope_parameters dict -> rope_theta, partial_rotary_factor, rope_scaling."""
    for key in _ROPE_KEYS_OUTSIDE_SCALING:
        if params.get(key) is not None:  # transformers 5 reads these from rope_parameters first
            out[key] = params[key]
    kind = rope_type(params)
    if kind == "default" or out.get("rope_scaling"):
        return
    scaling = {k: v for k, v in params.items() if k not in _ROPE_KEYS_OUTSIDE_SCALING}
    scaling["rope_type"] = kind
    out["rope_scaling"] = scaling


def _rope(out: dict) -> None:
    params = out.get("rope_parameters")
    if isinstance(params, dict) and params:
        if not _is_per_layer(params):
            _apply_rope(out, params)
        else:
            layers = {k: v for k, v in params.items() if v is not None}
            full = layers.get("full_attention") or next(iter(layers.values()))
            _apply_rope(out, full)
            local = layers.get("sliding_attention")
            if local is not None and rope_type(local) == "default" and "rope_theta" in local:
                out.setdefault("rope_local_base_freq", local["rope_theta"])
    scaling = out.get("rope_scaling")
    if isinstance(scaling, dict):
        scaling = out["rope_scaling"] = dict(scaling)
        kind = rope_type(scaling)
        scaling.setdefault("type", kind)  # phi3 reads "type" only; the rest read either
        if kind in _NEEDS_ORIGINAL_MAX and "original_max_position_embeddings" not in scaling:
            pretrained = out.get("original_max_position_embeddings")
            pretrained = pretrained or out.get("max_position_embeddings")
            if pretrained is not None:
                scaling["original_max_position_embeddings"] = pretrained


def to_legacy(config: dict) -> dict:
    """A copy of `config` with the transformers-4 keys filled in from their 5.x spellings (pure)."""
    out = copy.deepcopy(config)
    if out.get("dtype") is not None:
        out.setdefault("torch_dtype", out["dtype"])
    model_type = str(out.get("model_type"))
    if model_type in _TIE_DEFAULTS:
        out.setdefault("tie_word_embeddings", _TIE_DEFAULTS[model_type])
    for stored, field in _RENAMED.get(model_type, {}).items():
        if stored in out:
            out.setdefault(field, out[stored])
    _rope(out)
    if isinstance(out.get("text_config"), dict):
        out["text_config"] = to_legacy(out["text_config"])
    return out


def _fields(args_cls: Any) -> set[str]:
    if dataclasses.is_dataclass(args_cls):
        return {f.name for f in dataclasses.fields(args_cls)}
    return set()


def _refuse(model_type: str, what: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"config.json sets {what}, which mlx-lm's {model_type} model does not apply: "
        "its output would silently differ from the original model",
        hint="Use a checkpoint without this setting, or another architecture.",
    )


def _check_scaling(config: dict, model_type: str, fields: set[str], module: ModuleType) -> None:
    scaling: Any = config.get("rope_scaling")  # JSON
    kind = rope_type(scaling)
    if kind == "default":
        return
    if "rope_scaling" not in fields:
        allowed: frozenset[str] | None = frozenset({"default"})
    else:
        allowed = _OWN_ROPE_TYPES.get(model_type)
        if allowed is None and "initialize_rope" in vars(module):
            allowed = _INITIALIZE_ROPE_TYPES
    # allowed None: the class reads rope_scaling its own way; we cannot tell, so trust it.
    if allowed is not None and kind not in allowed:
        raise _refuse(model_type, f"RoPE scaling type {kind!r} (rope_scaling/rope_parameters)")
    for key, assumed in _IGNORED_SCALING_KEYS.get(kind, {}).items():
        if key in scaling and scaling[key] is not None and scaling[key] != assumed:
            raise _refuse(model_type, f"rope_parameters.{key} = {scaling[key]!r}")
    if kind == "longrope" and scaling.get("short_factor") != scaling.get("long_factor"):
        # mlx-lm applies long_factor at every length; transformers uses short_factor up to the
        # pretraining length. Refusing would shut out every Phi-3 128k / Phi-3.5 checkpoint, so
        # this one difference is let through, loudly.
        log.warning(
            "%s: rope_parameters.short_factor is not applied by mlx-lm (it uses long_factor at "
            "every length): below %s tokens outputs differ from transformers",
            model_type,
            config.get("original_max_position_embeddings"),
        )
    if kind == "longrope" and scaling.get("factor") is not None:
        pretrained = scaling.get("original_max_position_embeddings")
        pretrained = pretrained or config.get("original_max_position_embeddings") or 1
        implied = config.get("max_position_embeddings", 0) / pretrained
        if abs(float(scaling["factor"]) - implied) > 1e-6:  # mlx-lm derives it from the lengths
            raise _refuse(model_type, f"rope_parameters.factor = {scaling['factor']!r}")
    if kind == "yarn" and allowed is _INITIALIZE_ROPE_TYPES:
        _check_yarn_mscale(scaling, model_type)


def _yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _check_yarn_mscale(scaling: dict, model_type: str) -> None:
    """transformers and mlx-lm's YarnRoPE read a lone mscale / mscale_all_dim differently."""
    factor = float(scaling.get("factor") or 1.0)
    mscale, all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and all_dim:
        theirs = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, all_dim)
    else:
        theirs = _yarn_mscale(factor, 1.0)
    ours = _yarn_mscale(factor, 1 if mscale is None else mscale)
    ours /= _yarn_mscale(factor, all_dim or 0)
    if abs(ours - theirs) > 1e-9:
        raise _refuse(
            model_type, f"rope_parameters.mscale = {mscale!r} with mscale_all_dim = {all_dim!r}"
        )


def _check_per_layer(config: dict, model_type: str, fields: set[str]) -> None:
    params = config.get("rope_parameters")
    if not isinstance(params, dict) or not _is_per_layer(params):
        return
    layers = {k: v for k, v in params.items() if v is not None}
    if len({repr(sorted(v.items())) for v in layers.values()}) <= 1:
        return
    local = layers.get("sliding_attention")
    if set(layers) <= {"full_attention", "sliding_attention"} and "rope_local_base_freq" in fields:
        if local is None or rope_type(local) == "default":
            return
    raise _refuse(model_type, f"different rope_parameters per layer type ({', '.join(layers)})")


def check_supported(config: dict) -> None:
    """UnsupportedModelError when the class would drop a config key that changes the math."""
    model_type = str(config.get("model_type", ""))
    model_cls, args_cls = model_classes(config)
    module = importlib.import_module(model_cls.__module__)
    fields = _fields(args_cls)
    _check_scaling(config, model_type, fields, module)
    _check_per_layer(config, model_type, fields)
    factor = config.get("partial_rotary_factor")
    if factor is not None and float(factor) != 1.0 and "partial_rotary_factor" not in fields:
        raise _refuse(model_type, f"partial_rotary_factor = {factor!r}")


def normalize(config: dict) -> dict:
    """The config an mlx-lm class reads correctly, or UnsupportedModelError naming what it can't."""
    out = to_legacy(config)
    check_supported(out)
    return out


def sliding_window(config: dict) -> int | None:
    """The attention window some layers use, as transformers reads the config; None when none."""
    window = config.get("sliding_window")
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        return None
    layer_types = config.get("layer_types")
    if isinstance(layer_types, list):
        return window if "sliding_attention" in layer_types else None
    if "use_sliding_window" in config:  # Qwen's flag: the window is stored but off by default
        return window if config["use_sliding_window"] else None
    return window  # mistral, mixtral, phi3, gemma2 (4.x): every (or every other) layer


def unhonoured_window(config: dict) -> int | None:
    """The sliding window when the class attends over the full context instead (else None).

    Up to the window both attend to the same tokens, so outputs agree only that far.
    """
    window = sliding_window(config)
    if window is None:
        return None
    _, args_cls = model_classes(config)
    honoured = "layer_types" in _fields(args_cls) and isinstance(config.get("layer_types"), list)
    return None if honoured else window
