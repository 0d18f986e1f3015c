"""`python -m fuselm ...`: the command line (fuselm/cli.py)."""
from .cli import run

run()
