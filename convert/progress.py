"""Progress for long conversions: a tqdm bar in bytes (with a tensor count) on a TTY only."""

from __future__ import annotations

import sys


class ByteProgress:
    def __init__(self, total_bytes: int, total_tensors: int, *, enabled: bool = True):
        self._bar = None
        self._tensors = 0
        self._total_tensors = total_tensors
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(
                total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                desc="Converting", file=sys.stderr, dynamic_ncols=True,
            )  # fmt: skip

    def update(self, nbytes: int, tensors: int = 1) -> None:
        self._tensors += tensors  # output tensors, as the summary counts them
        if self._bar is not None:
            self._bar.update(nbytes)
            self._bar.set_postfix_str(
                f"{self._tensors}/{self._total_tensors} tensors", refresh=False
            )

    def __enter__(self) -> ByteProgress:
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()
