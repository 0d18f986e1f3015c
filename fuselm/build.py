"""`python -m fuselm.build MODEL -o DIR [...]`: the same as `fuselm build MODEL -o DIR [...]`
(fuselm/artifact/builder.py does the work; `--help` lists the options)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(["build", *sys.argv[1:]]))
