"""/metrics lines for the model pool (server/models_pool.py): loads, unloads, evictions and load
time per model (counters since start), memory charged and resident models (gauges now)."""

from __future__ import annotations

from typing import Any

from .metrics import PREFIX, _escape, _num


def engine_stats(pool: Any) -> dict[str, Any]:
    """The loaded engines' stats summed (numbers only), for the engine gauges."""
    total: dict[str, Any] = {}
    for slot in list(pool.slots.values()):
        for key, value in slot.state.engine.stats().items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                total[key] = total.get(key, 0) + value
    return total


def _family(name: str, kind: str, help_text: str, rows: list[tuple[str, float]]) -> list[str]:
    full = f"{PREFIX}_{name}"
    lines = [f"# HELP {full} {help_text}", f"# TYPE {full} {kind}"]
    lines += [f'{full}{{model="{_escape(m)}"}} {_num(v)}' for m, v in rows]
    return lines


def render(pool: Any) -> str:
    counts = sorted(pool.counts.items())
    loaded = {row["name"]: row for row in pool.loaded()}
    lines: list[str] = []
    for attr, help_text in (
        ("loads", "Times the model was loaded."),
        ("unloads", "Times the model was unloaded (idle past its keep-alive, evicted, or asked)."),
        ("evictions", "Times the model was unloaded to make room for another."),
    ):
        rows = [(m, getattr(c, attr)) for m, c in counts]
        lines += _family(f"model_{attr}_total", "counter", help_text, rows)
    rows = [(m, c.load_seconds) for m, c in counts]
    lines += _family("model_load_seconds_total", "counter", "Time spent loading the model.", rows)
    rows = [(m, float(loaded[m]["bytes"]) if m in loaded else 0.0) for m, _ in counts]
    lines += _family("model_memory_bytes", "gauge",
                     "Memory charged to the model while loaded (weights, KV, prefix cache).",
                     rows)  # fmt: skip
    gauges = (
        ("models_loaded", "Models in memory now.", len(loaded)),
        ("models_memory_budget_bytes", "The memory budget all loaded models share.",
         pool.governor.budget_bytes),
        ("models_memory_used_bytes", "Memory charged to loaded models now.",
         pool.governor.used_bytes),
    )  # fmt: skip
    for name, help_text, value in gauges:
        full = f"{PREFIX}_{name}"
        lines += [f"# HELP {full} {help_text}", f"# TYPE {full} gauge", f"{full} {_num(value)}"]
    return "\n".join(lines) + "\n"
