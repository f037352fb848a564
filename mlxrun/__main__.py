"""`python -m mlxrun`: the mlxrun command."""

from mlxrun.cli import main

main(prog_name="mlxrun")
