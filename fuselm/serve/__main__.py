"""`python -m fuselm.serve [options]`: the same as `fuselm serve [options]`."""
import sys

from ..cli import run

run(["serve", *sys.argv[1:]])
