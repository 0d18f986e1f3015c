"""`python -m fuselm.build MODEL -o DIR [...]`: the same as `fuselm build MODEL -o DIR [...]`
(fuselm/artifact/builder.py does the work; `--help` lists the options)."""
import sys

from .cli import run

if __name__ == "__main__":
    run(["build", *sys.argv[1:]])
