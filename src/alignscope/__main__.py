"""``python -m alignscope``: the command line (also what ``torchrun -m alignscope`` runs)."""

from alignscope.cli import app

app(prog_name="alignscope")
