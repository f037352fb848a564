"""`mlxrun convert`: click wiring only; the work is in mlxrun.convert."""

from __future__ import annotations

import click

from mlxrun.cli.common import friendly_errors, report_error
from mlxrun.convert.recipes import recipe_names  # pure Python: keeps --help light


@click.command("convert")
@click.argument("source")
@click.option("-o", "--output", type=click.Path(file_okay=False), help="Output directory "
              "(default: $MLXRUN_HOME/models/<name>).")  # fmt: skip
@click.option("--bits", type=click.Choice(["2", "3", "4", "5", "6", "8"]),
              help="Bits per weight (affine)  [default: 4]")  # fmt: skip
@click.option("--group-size", type=click.Choice(["32", "64", "128"]),
              help="Quantization group size  [default: 64]")  # fmt: skip
@click.option("--recipe", type=click.Choice(recipe_names()), help="Named recipe; mixed_L_H keeps "
              "embeddings, lm_head and sensitive v/down projections at H bits.")  # fmt: skip
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]),
              help="dtype for tensors that stay unquantized (default: the source's).")  # fmt: skip
@click.option("--no-quantize", is_flag=True, help="Only convert the layout, keep full precision.")
@click.option("--fit", metavar="SIZE|auto", help="Pick the best recipe that fits SIZE (e.g. 16GB) "
              "of memory with --context tokens of KV cache; auto = this machine's budget.")  # fmt: skip
@click.option("--context", type=click.IntRange(min=1), help="Context length the --fit planner "
              "reserves KV cache for  [default: 8192, at most the model's maximum]")  # fmt: skip
@click.option("--hosts", type=click.IntRange(min=1), default=1, help="Plan one host's share of a "
              "model split across this many machines (tensor parallel)  [default: 1]")  # fmt: skip
@click.option("--plan", "plan_only", is_flag=True, help="Print the memory plan and exit.")
@click.option(
    "--calibrate",
    type=click.Choice(["awq", "gptq", "dwq", "auto"]),
    help="Calibrated "
    "quantization (same bytes as the recipe, less loss); auto keeps the lowest measured KL.",
)
@click.option(
    "--calib",
    metavar="FILE|DIR",
    help="With --calibrate: calibration text (default: "
    "the built-in code corpus). Without: text file for the quality report.",
)
@click.option(
    "--max-kl",
    type=float,
    help="Pick the smallest recipe whose measured KL vs the "
    "source stays under this (within --fit's budget when given).",
)
@click.option("--no-verify", is_flag=True, help="Skip the quality report.")
@click.option("--force", is_flag=True, help="Replace a non-empty output directory.")
@click.option("--revision", help="Hub revision (branch, tag or commit).")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@friendly_errors
def convert_cmd(source, output, bits, group_size, recipe, dtype, no_quantize, fit, context, hosts,
                plan_only, calibrate, calib, max_kl, no_verify, force, revision, quiet):  # fmt: skip
    """Convert a Hugging Face checkpoint (local dir or Hub repo id) to MLX weights.

    \b
    Examples:
      mlxrun convert Qwen/Qwen2.5-Coder-1.5B-Instruct
      mlxrun convert ./my-model -o ./my-model-4bit --recipe mixed_4_6
      mlxrun convert meta-llama/Llama-3.1-8B-Instruct --fit 16GB --context 16384 --plan
      mlxrun convert ./my-model --bits 4 --calibrate auto
      mlxrun convert ./my-model --fit 16GB --max-kl 0.02 --calibrate gptq
    """
    bits = int(bits) if bits else None
    group_size = int(group_size) if group_size else None
    if plan_only:
        from mlxrun.convert.api import plan_for
        from mlxrun.convert.options import check_plan_only

        check_plan_only({"-o/--output": output is not None, "--no-quantize": no_quantize,
                         "--dtype": dtype is not None, "--calib": calib is not None,
                         "--calibrate": calibrate is not None, "--max-kl": max_kl is not None,
                         "--no-verify": no_verify, "--force": force})  # fmt: skip
        click.echo(plan_for(source, fit=fit, context=context, bits=bits, group_size=group_size,
                            recipe=recipe, revision=revision, hosts=hosts))  # fmt: skip
        return
    from mlxrun.convert.api import convert_model

    convert_model(
        source, output, bits=bits, group_size=group_size, recipe=recipe,
        quantize=not no_quantize, dtype=dtype, fit=fit, context=context, hosts=hosts,
        verify=not no_verify,
        calib=calib, force=force, quiet=quiet, revision=revision, exit_on_signal=report_error,
        calibrate=calibrate, max_kl=max_kl,
    )  # fmt: skip
