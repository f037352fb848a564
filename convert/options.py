"""What a conversion was asked for, and which requests cannot go together.

`bits` and `group_size` are None unless given, so a flag that another one would silently override
(`--bits 3 --recipe mixed_4_6`, `--no-quantize --bits 3`) is told apart from its default.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mlxrun.convert.writer import DEFAULT_MAX_SHARD_BYTES
from mlxrun.errors import InvalidRequestError

DEFAULT_BITS = 4
DEFAULT_GROUP_SIZE = 64
DEFAULT_CONTEXT = 8192


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
)  # fmt: skip


def check_conflicts(opts: ConvertOptions, *, plan_only: bool = False) -> None:
    """InvalidRequestError naming both flags of the first pair that cannot go together."""
    if opts.context is not None and opts.fit is None and not plan_only:
        raise InvalidRequestError(
            "--context is only read by the --fit planner; this conversion would ignore it",
            param="context",
            hint="Add --fit SIZE (or --fit auto), or drop --context.",
        )
    given = _given(opts)
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
