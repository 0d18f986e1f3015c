"""fuselm: a compiler-driven inference stack for transformer models.

Public API: `compile` (capture, fuse, generate kernels for "cpu" or "cuda") and the
error types; `fuselm.ir`, `fuselm.frontend`, `fuselm.passes` and `fuselm.models` are
importable subpackages. TVM and Triton are imported only when a target needs them.
"""
from .api import CompiledModule, compile
from .errors import FuselmError, UnsupportedKernelError, UnsupportedOpError

__version__ = "0.1.0"
__all__ = ["compile", "CompiledModule", "FuselmError", "UnsupportedKernelError", "UnsupportedOpError", "__version__"]
