"""`mlxrun convert`: click wiring only; the work is in mlxrun.convert."""

from __future__ import annotations

import click

from mlxrun.cli_common import friendly_errors
from mlxrun.convert.recipes import recipe_names  # pure Python: keeps --help light


@click.command("convert")
@click.argument("source")
@click.option("-o", "--output", type=click.Path(file_okay=False), help="Output directory "
              "(default: $MLXRUN_HOME/models/<name>).")  # fmt: skip
@click.option("--bits", type=click.Choice(["2", "3", "4", "5", "6", "8"]), default="4",
              show_default=True, help="Bits per weight (affine).")  # fmt: skip
@click.option("--group-size", type=click.Choice(["32", "64", "128"]), default="64",
              show_default=True, help="Quantization group size.")  # fmt: skip
@click.option("--recipe", type=click.Choice(recipe_names()), help="Named recipe; mixed_L_H keeps "
              "embeddings, lm_head and sensitive v/down projections at H bits.")  # fmt: skip
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]),
              help="dtype for tensors that stay unquantized (default: the source's).")  # fmt: skip
@click.option("--no-quantize", is_flag=True, help="Only convert the layout, keep full precision.")
@click.option("--fit", metavar="SIZE|auto", help="Pick the best recipe that fits SIZE (e.g. 16GB) "
              "of memory with --context tokens of KV cache; auto = this machine's budget.")  # fmt: skip
@click.option("--context", type=click.IntRange(min=1), default=8192, show_default=True,
              help="Context length the --fit planner reserves KV cache for.")  # fmt: skip
@click.option("--plan", "plan_only", is_flag=True, help="Print the memory plan and exit.")
@click.option("--calib", type=click.Path(dir_okay=False), help="Text file for the quality report.")
@click.option("--no-verify", is_flag=True, help="Skip the quality report.")
@click.option("--force", is_flag=True, help="Replace a non-empty output directory.")
@click.option("--revision", help="Hub revision (branch, tag or commit).")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@friendly_errors
def convert_cmd(source, output, bits, group_size, recipe, dtype, no_quantize, fit, context,
                plan_only, calib, no_verify, force, revision, quiet):  # fmt: skip
    """Convert a Hugging Face checkpoint (local dir or Hub repo id) to MLX weights.

    \b
    Examples:
      mlxrun convert Qwen/Qwen2.5-Coder-1.5B-Instruct
      mlxrun convert ./my-model -o ./my-model-4bit --recipe mixed_4_6
      mlxrun convert meta-llama/Llama-3.1-8B-Instruct --fit 16GB --context 16384 --plan
    """
    if plan_only:
        from mlxrun.convert.api import plan_for

        click.echo(plan_for(source, fit=fit, context=context, bits=int(bits),
                            group_size=int(group_size), recipe=recipe, revision=revision))  # fmt: skip
        return
    from mlxrun.convert.api import convert_model

    convert_model(
        source, output, bits=int(bits), group_size=int(group_size), recipe=recipe,
        quantize=not no_quantize, dtype=dtype, fit=fit, context=context, verify=not no_verify,
        calib=calib, force=force, quiet=quiet, revision=revision,
    )  # fmt: skip
