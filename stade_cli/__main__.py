"""`python -m stade_cli ...`, which is what `torchrun -m stade_cli ...` runs on every rank."""

from .cli import main

main()
