"""fuselm: a compiler-driven inference stack for transformer models.

Public API: `compile` (capture, fuse, generate kernels for "cpu" or "cuda"), `load` (an
ahead-of-time artifact of `fuselm build`, with no capture and no code generation), `LLM`
and `SamplingParams` (the serving engine on a compiled language model), `Encoder`
(sentence embeddings from a packed encoder), `QuantizeConfig`
(`quantize=` with its settings) and the error types; `fuselm.ir`, `fuselm.frontend`, `fuselm.passes` and `fuselm.models` are
importable subpackages. TVM and Triton are imported only when a target needs them, and
torch only when `compile`, `CompiledModule`, `load`, `LLM` or `Encoder` is first used: `import fuselm` and
the command line's argument parsing stay fast (and a Ctrl-C there is a clean exit).
"""
from .errors import (ArtifactError, CalibrationWarning, CaptureError, FallbackWarning, FuselmError, UnsupportedKernelError,
                     UnsupportedOpError)
from .lazy import lazy_attributes
from .quant.config import QuantizeConfig
from .sampling_params import SamplingParams

_LAZY = {"compile": "api", "CompiledModule": "api", "LLM": "llm", "Encoder": "encoder", "load": "artifact"}  # name -> module defining it


__getattr__ = lazy_attributes(__name__, globals(), _LAZY)

__version__ = "0.1.0"
__all__ = ["compile", "CompiledModule", "load", "LLM", "Encoder", "SamplingParams", "QuantizeConfig", "FuselmError", "ArtifactError", "CaptureError", "FallbackWarning",
           "CalibrationWarning", "UnsupportedKernelError", "UnsupportedOpError", "__version__"]
