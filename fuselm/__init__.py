"""fuselm: a compiler-driven inference stack for transformer models.

Public API: `compile` (capture, fuse, generate kernels for "cpu" or "cuda"), `LLM` and
`SamplingParams` (the serving engine on a compiled language model) and the error types; `fuselm.ir`, `fuselm.frontend`, `fuselm.passes` and `fuselm.models` are
importable subpackages. TVM and Triton are imported only when a target needs them.
"""
from .api import CompiledModule, compile
from .errors import FallbackWarning, FuselmError, UnsupportedKernelError, UnsupportedOpError
from .llm import LLM
from .sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["compile", "CompiledModule", "LLM", "SamplingParams", "FuselmError", "FallbackWarning",
           "UnsupportedKernelError", "UnsupportedOpError", "__version__"]
