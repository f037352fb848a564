"""The README.md model card written next to converted weights."""

from __future__ import annotations

import json
from pathlib import Path

from mlxrun.errors import format_size


def final_path(out_dir: Path) -> Path:
    """Where the model will live: the converter writes into a hidden sibling that is renamed."""
    from mlxrun.convert.api import PARTIAL_TAG

    name = out_dir.name
    if name.startswith(".") and PARTIAL_TAG in name:
        return out_dir.with_name(name[1:].rsplit(PARTIAL_TAG, 1)[0])
    return out_dir


def _front_matter(info: dict) -> str:
    from mlxrun.hub import is_repo_id

    lines = ["---", "library_name: mlx", "pipeline_tag: text-generation", "tags:"]
    lines += ["- mlx", "- mlxrun"]
    source = str(info.get("source") or "")
    if source and is_repo_id(source):
        lines.append(f"base_model: {json.dumps(source)}")  # a JSON string is valid YAML
    lines.append("---")
    return "\n".join(lines)


def fmt_metric(value, spec: str = ".4f") -> str:
    """A metric for people: n/a for None; tiny non-zero values in scientific notation, since
    a good 8-bit conversion has KL divergences far below 0.0001."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if spec == ".4f" and 0 < abs(value) < 1e-3:
            return format(value, ".2e")
        return format(value, spec)
    return str(value)


def quality_summary(q: dict) -> str:
    """One line for a quality report (QualityReport as a dict, or quality.json's "quality")."""
    if q.get("method") == "end-to-end":
        return (
            f"Quality (end-to-end, {q.get('tokens')} tokens): KL {fmt_metric(q.get('kl_divergence'))}, "
            f"top-1 {fmt_metric(q.get('top1_agreement'), '.1%')}, "
            f"ppl ratio {fmt_metric(q.get('ppl_ratio'), '.3f')}"
        )
    worst = (q.get("worst_tensors") or ["-"])[0]
    return (
        f"Quality (per-tensor, {q.get('tensors')} tensors): mean rel. error "
        f"{fmt_metric(q.get('mean_rel_error'))}, max {fmt_metric(q.get('max_rel_error'))} ({worst})"
    )


def _conversion_table(info: dict) -> str:
    size = info.get("size_bytes")
    rows = [
        ("Source", f"`{info.get('source', 'unknown')}`"),
        ("Architecture", f"`{info.get('architecture', 'unknown')}`"),
        ("Recipe", info.get("recipe", "unknown")),
        ("Bits per weight", fmt_metric(info.get("bits_per_weight"), ".3f")),
        ("Size", format_size(size) if isinstance(size, int) else "n/a"),
        ("Tensors", fmt_metric(info.get("num_tensors"))),
    ]
    cal = info.get("calibration")
    if cal:
        rows.append(("Calibration", f"{cal['method']} on {cal['tokens']} tokens "
                     f"({cal['sequences']} sequences) of {cal['data']}"))  # fmt: skip
    moe = info.get("moe_kept")
    if moe:
        rows.append(("MoE routers / shared experts",
                     f"{moe['layers']} layers kept at {moe['min_bits']} bits or more"))  # fmt: skip
    return "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


def _tried_section(tried: list) -> str:
    """Every candidate `--calibrate auto` / `--max-kl` converted and measured."""
    head = "| Recipe | Calibration | Bits/weight | Size | KL | Top-1 | PPL ratio | |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in tried:
        lines.append(
            f"| {r['recipe']} | {r['method']} | {fmt_metric(r['bits_per_weight'], '.3f')} | "
            f"{format_size(r['size_bytes'])} | {fmt_metric(r['kl_divergence'])} | "
            f"{fmt_metric(r['top1_agreement'], '.1%')} | {fmt_metric(r['ppl_ratio'], '.4f')} | "
            f"{'**chosen**' if r.get('chosen') else ''} |"
        )
    return "## Candidates measured\n\n" + "\n".join(lines)


def _quality_section(q) -> str:
    if q is None:
        return "## Quality\n\nNot measured (converted with `--no-verify`)."
    if q.method == "end-to-end":
        head = (
            f"Measured **end to end**: the source (at its own precision) and this model were run "
            f"over {q.tokens} tokens of {'built-in sample text' if q.calib == 'built-in' else f'`{q.calib}`'} "
            "and their next-token distributions compared."
        )
        rows = [
            ("KL divergence (source ‖ converted), nats/token", fmt_metric(q.kl_divergence)),
            ("Top-1 agreement", fmt_metric(q.top1_agreement, ".1%")),
            ("Perplexity, source", fmt_metric(q.ppl_source, ".3f")),
            ("Perplexity, converted", fmt_metric(q.ppl_converted, ".3f")),
            ("Perplexity ratio", fmt_metric(q.ppl_ratio, ".4f")),
        ]
    else:
        why = f" ({q.reason})" if q.reason else ""
        head = (
            f"Measured **per tensor**{why}: each quantized weight was dequantized and compared "
            "with its source tensor (relative Frobenius error, ‖W′ − W‖ / ‖W‖)."
        )
        worst = ", ".join(f"`{n}`" for n in q.worst_tensors or ()) or "n/a"
        rows = [
            ("Tensors compared", fmt_metric(q.tensors)),
            ("Mean relative error", fmt_metric(q.mean_rel_error)),
            ("Max relative error", fmt_metric(q.max_rel_error)),
            ("Worst tensors", worst),
        ]
    table = "\n".join(["| Metric | Value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])
    return f"## Quality\n\n{head}\n\n{table}\n\nThe figures are also in `quality.json`."


def render_card(out_dir: Path, info: dict, quality=None) -> str:
    """The whole README.md: front matter, description, conversion facts, quality, usage."""
    path = final_path(Path(out_dir))
    source = info.get("source", "the source model")
    usage = (
        "```bash\n"
        f'mlxrun chat "{path}"\n'
        "# or with mlx-lm (the layout is mlx-lm compatible):\n"
        f'mlx_lm.generate --model "{path}" --prompt "Hello"\n'
        "```"
    )
    parts = [
        _front_matter(info),
        f"# {path.name}",
        f"MLX weights of `{source}`, converted with `mlxrun convert` "
        f"({info.get('recipe', 'unknown recipe')}).",
        "## Conversion\n\n" + _conversion_table(info),
        _quality_section(quality),
        *([_tried_section(info["tried"])] if info.get("tried") else []),
        "## Use\n\n" + usage,
    ]
    return "\n\n".join(parts) + "\n"
