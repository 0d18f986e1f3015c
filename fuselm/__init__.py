"""fuselm: a compiler-driven inference stack for transformer models.

The public API grows as each piece works: today the errors; `fuselm.ir`,
`fuselm.frontend`, `fuselm.passes` and `fuselm.models` are importable subpackages.
"""
from .errors import FuselmError, UnsupportedOpError

__version__ = "0.1.0"
__all__ = ["FuselmError", "UnsupportedOpError", "__version__"]
