"""`mlxrun list / show / rm / pull`: click wiring over mlxrun.store (imported inside commands)."""

from __future__ import annotations

import json

import click

from mlxrun.cli.common import friendly_errors
from mlxrun.convert.recipes import recipe_names  # pure Python: keeps --help light

_BITS = ["2", "3", "4", "5", "6", "8"]


def _context(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


@click.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array instead of a table.")
@friendly_errors
def list_cmd(as_json: bool) -> None:
    """List the models in the local store ($MLXRUN_HOME/models)."""
    from mlxrun.errors import format_size
    from mlxrun.store import list_models

    models = list_models()
    if as_json:
        click.echo(json.dumps([m.to_dict() for m in models], indent=2))
        return
    if not models:
        click.echo("no models yet — try `mlxrun pull REPO` or `mlxrun convert REPO`")
        return
    rows = [["NAME", "ARCH", "SIZE", "BITS/W", "CONTEXT", "QUANT"]]
    for m in models:
        rows.append(
            [
                m.name,
                m.architecture,
                format_size(m.size_bytes),
                f"{m.bits_per_weight:.2f}",
                _context(m.context_length),
                m.quantization,
            ]
        )
    click.echo(_table(rows))


@click.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
@friendly_errors
def show_cmd(name: str, as_json: bool) -> None:
    """Show everything known about one stored model."""
    from mlxrun.errors import format_size
    from mlxrun.store import get_model, read_quality, tensor_count

    info = get_model(name)
    d = info.to_dict()
    d["tensors"] = tensor_count(info.path)
    quality = read_quality(info.path)
    if as_json:
        click.echo(json.dumps({**d, "quality": quality}, indent=2))
        return
    d["size_bytes"] = f"{format_size(info.size_bytes)} ({info.size_bytes} bytes)"
    d["bits_per_weight"] = f"{info.bits_per_weight:.3f}"
    d["context_length"] = str(info.context_length or "unknown")
    d["source"] = info.source or "unknown"
    d.update(_quality_rows(quality))
    width = max(len(k) for k in d)
    for key, value in d.items():
        click.echo(f"{key.ljust(width)}  {value}")


def _quality_rows(quality: dict | None) -> dict[str, str]:
    """quality.json's figures for `show`: its one-line summary, then each metric."""
    from mlxrun.convert.card import fmt_metric, quality_summary

    if quality is None:
        return {"quality": "not measured"}
    rows = {"quality": quality_summary(quality)}
    specs = {"kl_divergence": ".4f", "top1_agreement": ".1%", "ppl_source": ".3f",
             "ppl_converted": ".3f", "ppl_ratio": ".4f", "mean_rel_error": ".4f",
             "max_rel_error": ".4f"}  # fmt: skip
    for key, spec in specs.items():
        if quality.get(key) is not None:
            rows[f"quality.{key}"] = fmt_metric(quality[key], spec)
    if quality.get("calib"):
        rows["quality.calib"] = str(quality["calib"])
    return rows


@click.command("rm")
@click.argument("name")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@friendly_errors
def rm_cmd(name: str, yes: bool) -> None:
    """Delete a model from the local store."""
    from mlxrun.errors import format_size
    from mlxrun.store import model_path, remove_model, weight_bytes

    path = model_path(name)
    if not yes:
        click.confirm(
            f"Remove {name} ({format_size(weight_bytes(path))}) at {path}?", abort=True, err=True
        )
    remove_model(name)
    click.echo(f"Removed {name}")


@click.command("pull")
@click.argument("repo")
@click.option(
    "--name", help="Store name (default: the repo name, plus a bits suffix if converted)."
)
@click.option("--revision", help="Hub revision (branch, tag or commit).")
@click.option("--bits", type=click.Choice(_BITS), help="Bits per weight when converting [4].")
@click.option("--group-size", type=click.Choice(["32", "64", "128"]), help="Group size [64].")
@click.option("--recipe", type=click.Choice(recipe_names()), help="Named recipe when converting.")
@click.option("--no-verify", is_flag=True, help="Skip the quality report when converting.")
@click.option("--force", is_flag=True, help="Replace a stored model of the same name.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@friendly_errors
def pull_cmd(repo, name, revision, bits, group_size, recipe, no_verify, force, quiet) -> None:
    """Download a model from the Hub into the local store.

    An MLX repo (e.g. from mlx-community) is stored as is; a plain Hugging Face checkpoint is
    downloaded and converted (4-bit by default).

    \b
    Examples:
      mlxrun pull mlx-community/Qwen2.5-Coder-1.5B-Instruct-4bit
      mlxrun pull Qwen/Qwen2.5-Coder-1.5B-Instruct --recipe mixed_4_6
    """
    from mlxrun import hub, store
    from mlxrun.errors import InvalidRequestError

    if not hub.is_repo_id(repo):
        raise InvalidRequestError(
            f"{repo!r} is not a Hub repo id (owner/name)",
            param="repo",
            hint="To add a local checkpoint, run `mlxrun convert PATH`.",
        )
    if name is not None:
        store.check_free(name, force=force)
    _check_convert_flags(bits, group_size, recipe)  # before the download, not after
    src = hub.resolve_source(repo, revision=revision, progress=not quiet)
    if hub.is_mlx_model(src):
        if bits or group_size or recipe:
            raise InvalidRequestError(
                f"{repo} already holds MLX weights; it cannot be re-quantized on pull",
                param="bits",
                hint="Drop --bits/--group-size/--recipe, or convert the original checkpoint.",
            )
        name = name or store.default_name(repo)
        meta = {"source": repo, "revision": revision, "commit": src.name}
        dest = store.add_from_dir(src, name, meta, force=force)
    else:
        dest = _convert(repo, name, revision, bits, group_size, recipe, no_verify, force, quiet)
    info = store.get_model(dest.name)
    click.echo(
        f"Pulled {repo} -> {info.name} ({info.quantization}, {info.bits_per_weight:.2f} b/w)"
    )


def _check_convert_flags(bits, group_size, recipe) -> None:
    from mlxrun.convert.options import ConvertOptions, check_conflicts

    check_conflicts(ConvertOptions(bits=int(bits) if bits else None, recipe=recipe,
                                   group_size=int(group_size) if group_size else None))  # fmt: skip


def _convert(repo, name, revision, bits, group_size, recipe, no_verify, force, quiet):
    from mlxrun.cli.common import report_error
    from mlxrun.convert.api import convert_model
    from mlxrun.store import models_dir

    options = {"verify": not no_verify, "force": force, "quiet": quiet, "revision": revision,
               "exit_on_signal": report_error}  # fmt: skip
    if bits:
        options["bits"] = int(bits)
    if group_size:
        options["group_size"] = int(group_size)
    if recipe:
        options["recipe"] = recipe
    # No --name: the converter names it as `mlxrun convert` would (repo name + recipe suffix).
    output = models_dir() / name if name else None
    return convert_model(repo, output, **options).output
