"""`python -m mlxrun.cli`: the mlxrun command (as `python -m mlxrun`)."""

from mlxrun.cli.group import main

main(prog_name="mlxrun")
