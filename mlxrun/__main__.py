"""`python -m mlxrun`: the mlxrun command."""

from mlxrun.cli.group import main

main(prog_name="mlxrun")
