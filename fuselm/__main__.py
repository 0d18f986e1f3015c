"""`python -m fuselm ...`: the command line (fuselm/cli.py)."""
import sys

from .cli import main

sys.exit(main())
