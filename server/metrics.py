"""Prometheus text exposition, written by hand (no client library): counters, histograms, gauges.

Everything is updated from the event loop's thread only, so no locks are needed.
"""

from __future__ import annotations

import bisect
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

PREFIX = "mlxrun"

# Seconds: local TTFT spans a few ms (cache hit) to minutes (long prompt on a small machine).
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
MAX_FIELD_LABELS = 64  # distinct ignored-field labels; clients choose the names, so cap them
OTHER_FIELD = "_other"


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: Iterable[float]):
        self.name, self.help = name, help_text
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        if not math.isfinite(value):
            return
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def render(self) -> list[str]:
        name = f"{PREFIX}_{self.name}"
        lines = [f"# HELP {name} {self.help}", f"# TYPE {name} histogram"]
        running = 0
        for bound, count in zip(self.buckets, self.counts, strict=False):
            running += count
            lines.append(f'{name}_bucket{{le="{_num(bound)}"}} {running}')
        lines.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        lines.append(f"{name}_sum {_num(self.sum)}")
        lines.append(f"{name}_count {self.count}")
        return lines


def _num(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """What the server counts itself; engine gauges are read from engine.stats() at scrape time."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = defaultdict(int)  # (endpoint, status)
        self.ignored_fields: dict[str, int] = defaultdict(int)  # request fields we did not act on
        self.by_key: dict[tuple[str, int], int] = defaultdict(int)  # (API key name, status)
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.generation_tokens = 0
        self.aborted = 0
        self.in_flight = 0
        self.ttft = Histogram(
            "time_to_first_token_seconds",
            "Time from request arrival to its first token.",
            TTFT_BUCKETS,
        )
        self.itl = Histogram(
            "inter_token_latency_seconds",
            "Time between successive tokens of one choice.",
            ITL_BUCKETS,
        )
        self.duration = Histogram(
            "request_duration_seconds",
            "Time from request arrival to its last byte.",
            DURATION_BUCKETS,
        )

    def count_request(self, endpoint: str, status: int, key: str | None = None) -> None:
        self.requests[(endpoint, status)] += 1
        if key is not None:  # the key's name (server/auth.py), never the key itself
            self.by_key[(key, status)] += 1

    def count_ignored(self, labels: Iterable[str]) -> None:
        for label in labels:
            if label not in self.ignored_fields and len(self.ignored_fields) >= MAX_FIELD_LABELS:
                label = OTHER_FIELD
            self.ignored_fields[label] += 1

    def render(self, gauges: Mapping[str, tuple[str, float]]) -> str:
        """The exposition text; `gauges` maps a metric name to (help, value)."""
        lines: list[str] = []
        name = f"{PREFIX}_requests_total"
        lines += [
            f"# HELP {name} HTTP API requests by endpoint and status.",
            f"# TYPE {name} counter",
        ]
        for (endpoint, status), count in sorted(self.requests.items()):
            lines.append(f'{name}{{endpoint="{_escape(endpoint)}",status="{status}"}} {count}')
        name = f"{PREFIX}_ignored_fields_total"
        lines += [
            f"# HELP {name} Request fields accepted but not acted on (unknown or no-op), by path.",
            f"# TYPE {name} counter",
        ]
        for field, count in sorted(self.ignored_fields.items()):
            lines.append(f'{name}{{field="{_escape(field)}"}} {count}')
        if self.by_key:
            name = f"{PREFIX}_key_requests_total"
            lines += [f"# HELP {name} HTTP API requests by API key name and status.",
                      f"# TYPE {name} counter"]  # fmt: skip
            for (key, status), count in sorted(self.by_key.items()):
                lines.append(f'{name}{{key="{_escape(key)}",status="{status}"}} {count}')
        counters: dict[str, tuple[str, float]] = {
            "prompt_tokens_total": ("Prompt tokens processed.", self.prompt_tokens),
            "cached_prompt_tokens_total": ("Prompt tokens served from the prefix cache.", self.cached_tokens),
            "generation_tokens_total": ("Tokens generated.", self.generation_tokens),
            "aborted_requests_total": ("Engine requests aborted (disconnect, stop string, error).", self.aborted),
        }  # fmt: skip
        for key, (help_text, value) in counters.items():
            lines += _single(key, help_text, "counter", value)
        lines += _single(
            "requests_in_flight", "HTTP requests being served now.", "gauge", self.in_flight
        )
        for key, (help_text, value) in gauges.items():
            lines += _single(key, help_text, "gauge", value)
        for hist in (self.ttft, self.itl, self.duration):
            lines += hist.render()
        return "\n".join(lines) + "\n"


def _single(key: str, help_text: str, kind: str, value: Any) -> list[str]:
    name = f"{PREFIX}_{key}"
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {_num(float(value))}"]
