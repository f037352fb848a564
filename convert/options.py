"""What a conversion was asked for, and which requests cannot go together.

`bits` and `group_size` are None unless given, so a flag that another one would silently override
(`--bits 3 --recipe mixed_4_6`, `--no-quantize --bits 3`) is told apart from its default.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mlxrun.convert.calib_data import DEFAULT_SAMPLES, DEFAULT_SEQ_LEN
from mlxrun.convert.writer import DEFAULT_MAX_SHARD_BYTES
from mlxrun.errors import InvalidRequestError

DEFAULT_BITS = 4
DEFAULT_GROUP_SIZE = 64
DEFAULT_CONTEXT = 8192
CALIBRATE_CHOICES = ("awq", "gptq", "dwq", "auto")


@dataclass(frozen=True)
class ConvertOptions:
    bits: int | None = None  # None: DEFAULT_BITS
    group_size: int | None = None  # None: DEFAULT_GROUP_SIZE
    recipe: str | None = None
    quantize: bool = True
    dtype: str | None = None
    fit: str | None = None  # a size such as "16GB", or "auto"
    context: int | None = None  # None: DEFAULT_CONTEXT, clamped to the model's maximum
    hosts: int = 1  # --fit plans one host's share of a model split across this many
    verify: bool = True
    calib: str | None = None
    force: bool = False
    quiet: bool = False
    revision: str | None = None
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    calibrate: str | None = None  # awq | gptq | dwq | auto (convert/calibrate.py)
    max_kl: float | None = None  # pick the smallest recipe whose measured KL stays under this
    calib_samples: int = DEFAULT_SAMPLES  # calibration sequences ...
    calib_seq_len: int = DEFAULT_SEQ_LEN  # ... of this many tokens
    # Set by front ends that own the process (the CLI): report an error, return the exit code.
    # With it a signal stops the conversion even while MLX computes (see convert/cancel.py).
    exit_on_signal: Callable[[BaseException], int] | None = None

    @property
    def bits_or_default(self) -> int:
        return self.bits if self.bits is not None else DEFAULT_BITS

    @property
    def group_size_or_default(self) -> int:
        return self.group_size if self.group_size is not None else DEFAULT_GROUP_SIZE


def _given(opts: ConvertOptions) -> dict[str, bool]:
    """Which of the flags that can conflict were given, by their CLI names."""
    return {
        "--no-quantize": not opts.quantize,
        "--bits": opts.bits is not None,
        "--group-size": opts.group_size is not None,
        "--recipe": opts.recipe is not None,
        "--fit": opts.fit is not None,
        "--calib": opts.calib is not None,
        "--no-verify": not opts.verify,
        "--calibrate": opts.calibrate is not None,
        "--calibrate auto": opts.calibrate == "auto",
        "--max-kl": opts.max_kl is not None,
    }


# (flag, flag, why they cannot go together, what to do instead)
CONFLICTS = (
    ("--no-quantize", "--bits", "an unquantized model has no bit width", "drop one of them"),
    ("--no-quantize", "--group-size", "an unquantized model has no quantization groups",
     "drop one of them"),
    ("--no-quantize", "--recipe", "a recipe says how to quantize", "drop one of them"),
    ("--no-quantize", "--fit", "--fit picks a quantization recipe", "drop one of them"),
    ("--recipe", "--bits", "the recipe sets the bits", "use --recipe qN for uniform N bits"),
    ("--fit", "--bits", "--fit picks the bits itself", "drop --bits, or drop --fit"),
    ("--fit", "--recipe", "--fit picks the recipe itself", "drop --recipe, or drop --fit"),
    ("--calib", "--no-verify", "the calibration text is only read by the quality check",
     "drop one of them"),
    ("--no-quantize", "--calibrate", "calibration chooses quantized values", "drop one of them"),
    ("--no-quantize", "--max-kl", "--max-kl picks a quantization recipe", "drop one of them"),
    ("--max-kl", "--recipe", "--max-kl picks the recipe itself", "drop --recipe, or drop --max-kl"),
    ("--max-kl", "--bits", "--max-kl picks the bits itself", "drop --bits, or drop --max-kl"),
    ("--max-kl", "--no-verify", "--max-kl measures each recipe's KL", "drop --no-verify"),
    ("--calibrate auto", "--no-verify", "auto measures each method's KL to pick one",
     "name a method (awq, gptq, dwq), or drop --no-verify"),
)  # fmt: skip


def check_conflicts(opts: ConvertOptions, *, plan_only: bool = False) -> None:
    """InvalidRequestError naming both flags of the first pair that cannot go together."""
    if opts.context is not None and opts.fit is None and not plan_only:
        raise InvalidRequestError(
            "--context is only read by the --fit planner; this conversion would ignore it",
            param="context",
            hint="Add --fit SIZE (or --fit auto), or drop --context.",
        )
    if opts.calibrate is not None and opts.calibrate not in CALIBRATE_CHOICES:
        raise InvalidRequestError(
            f"--calibrate must be one of {', '.join(CALIBRATE_CHOICES)}, got {opts.calibrate!r}",
            param="calibrate",
        )
    given = _given(opts)
    if opts.calibrate is not None:
        given["--calib"] = False  # with --calibrate it is the calibration data, not the check's
    if opts.max_kl is not None and not opts.max_kl > 0:
        raise InvalidRequestError(f"--max-kl must be above 0, got {opts.max_kl}", param="max_kl")
    for a, b, why, fix in CONFLICTS:
        if given[a] and given[b]:
            raise InvalidRequestError(
                f"{a} and {b} cannot be used together: {why}",
                param=b.lstrip("-").replace("-", "_"),
                hint=f"{fix[0].upper()}{fix[1:]}.",
            )


def check_plan_only(given: dict[str, bool]) -> None:
    """`--plan` only prints the memory plan: flags about writing a model would be ignored."""
    for flag, was_given in given.items():
        if was_given:
            raise InvalidRequestError(
                f"--plan and {flag} cannot be used together: --plan only prints the memory plan "
                "and writes nothing",
                param="plan",
                hint=f"Drop {flag} to see the plan, or drop --plan to convert.",
            )
