"""`python -m fuselm.serve [options]`: the same as `fuselm serve [options]`."""
import sys

from ..cli import main

sys.exit(main(["serve", *sys.argv[1:]]))
