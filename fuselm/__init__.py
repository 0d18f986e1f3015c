"""fuselm: a compiler-driven inference stack for transformer models.

Public API: `compile` (capture, fuse, generate kernels for "cpu" or "cuda"), `LLM` and
`SamplingParams` (the serving engine on a compiled language model) and the error types; `fuselm.ir`, `fuselm.frontend`, `fuselm.passes` and `fuselm.models` are
importable subpackages. TVM and Triton are imported only when a target needs them, and
torch only when `compile`, `CompiledModule` or `LLM` is first used: `import fuselm` and
the command line's argument parsing stay fast (and a Ctrl-C there is a clean exit).
"""
import importlib

from .errors import FallbackWarning, FuselmError, UnsupportedKernelError, UnsupportedOpError
from .sampling_params import SamplingParams

_LAZY = {"compile": "api", "CompiledModule": "api", "LLM": "llm"}  # name -> module that defines it


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fuselm' has no attribute {name!r}")

__version__ = "0.1.0"
__all__ = ["compile", "CompiledModule", "LLM", "SamplingParams", "FuselmError", "FallbackWarning",
           "UnsupportedKernelError", "UnsupportedOpError", "__version__"]
