"""Typed errors: the one place user-facing messages are defined.

Each error carries a one-line message and a hint (the next step to take). The CLI prints both; the
server maps the type to an HTTP status. Nobody parses these strings.
"""

from __future__ import annotations


class MlxrunError(Exception):
    """Base of every error mlxrun raises on purpose."""

    hint: str = ""
    exit_code: int = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        if hint is not None:
            self.hint = hint

    def __str__(self) -> str:
        return self.message


class ModelNotFoundError(MlxrunError):
    hint = "Run `mlxrun list` to see local models, or pass a local path or a Hub repo id."


class RepoNotFoundError(ModelNotFoundError):
    hint = "Check the repo id on the Hub; gated or private repos need `huggingface-cli login`."


class OfflineError(ModelNotFoundError):
    hint = "Connect to the network, or unset HF_HUB_OFFLINE, or download the model first."


class NotAModelError(MlxrunError):
    hint = "Point at a directory holding config.json and *.safetensors (a Hub checkpoint)."


class UnsupportedModelError(MlxrunError):
    hint = "Convert a model of a supported architecture (see `mlxrun convert --help`)."


class IncompatibleDraftError(MlxrunError):
    hint = "Pick a draft model of the same family as the target (the same tokenizer)."


class CorruptCheckpointError(MlxrunError):
    hint = "Re-download the checkpoint (delete it from the HF cache first)."


class OutputExistsError(MlxrunError):
    hint = "Choose another output directory, or pass --force to replace it."


class DiskFullError(MlxrunError):
    hint = "Free some disk space or write the output elsewhere with -o."


class InsufficientMemoryError(MlxrunError):
    hint = "Use fewer bits (--bits 3 or a smaller recipe), a shorter --context, or pass --force."

    def __init__(self, message: str, needed: int = 0, available: int = 0, hint: str | None = None):
        super().__init__(message, hint)
        self.needed = needed
        self.available = available

    @property
    def missing(self) -> int:
        return max(0, self.needed - self.available)


class InvalidRequestError(MlxrunError):
    hint = "Fix the value named above and try again."

    def __init__(self, message: str, param: str | None = None, hint: str | None = None):
        super().__init__(message, hint)
        self.param = param


class ContextLengthExceededError(InvalidRequestError):
    def __init__(
        self,
        prompt_tokens: int,
        limit: int,
        param: str | None = "messages",
        max_tokens: int | None = None,
    ):
        if max_tokens is None:
            msg = f"the prompt has {prompt_tokens} tokens but the context length is {limit}"
        else:
            msg = (
                f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceed "
                f"the context length ({limit})"
            )
        super().__init__(
            msg, param=param, hint="Shorten the prompt, lower max_tokens or raise --context."
        )
        self.prompt_tokens = prompt_tokens
        self.limit = limit
        self.max_tokens = max_tokens


class EngineOverloadedError(MlxrunError):
    hint = "Retry after a moment."

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class DistributedError(MlxrunError):
    """A distributed run (mlx.launch) that cannot start or go on: bad setup, hosts that differ."""

    hint = "Check the hosts, the backend and that every host holds the same model."


class RankFailedError(DistributedError):
    """A peer rank died or stopped answering; the step cannot complete without it."""

    hint = "Restart the launch; check the failed host's log and its network link."

    def __init__(self, message: str, rank: int | None = None, hint: str | None = None):
        super().__init__(message, hint)
        self.rank = rank


class ConversionInterruptedError(MlxrunError):
    """A conversion stopped by Ctrl-C or SIGTERM; nothing was left at the output."""

    exit_code = 130
    hint = "Run the same command again to start over."


def format_size(n: float) -> str:
    """Human-readable bytes, e.g. 1.5 GB (decimal units, as disk sizes are shown)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def parse_size(text: str) -> int:
    """'16GB', '512MiB', '1.5G', '1000' -> bytes. Raises InvalidRequestError."""
    s = text.strip().upper().replace(" ", "")
    units = {
        "TIB": 1 << 40, "GIB": 1 << 30, "MIB": 1 << 20, "KIB": 1 << 10,
        "TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3,
        "T": 10**12, "G": 10**9, "M": 10**6, "K": 10**3, "B": 1,
    }  # fmt: skip
    suffix = next((u for u in units if s.endswith(u)), "")
    number, mult = (s[: -len(suffix)], units[suffix]) if suffix else (s, 1)
    try:
        value = float(number)
    except ValueError:
        raise InvalidRequestError(
            f"cannot read size {text!r}", param="size", hint="Write sizes like 16GB or 512MB."
        ) from None
    if value <= 0:
        raise InvalidRequestError(f"size must be positive, got {text!r}", param="size")
    return int(value * mult)
