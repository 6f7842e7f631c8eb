"""`python -m stade_cli ...`, which is what `torchrun -m stade_cli ...` runs on every rank."""

from stade_cli.cli import main

main()
