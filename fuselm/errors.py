"""Errors fuselm raises to users; each names the problem and where it came from."""


class FuselmError(Exception):
    """Base class of fuselm's own errors."""


class UnsupportedOpError(FuselmError):
    """A captured model uses an op the frontend cannot map to the IR."""

    def __init__(self, op: str, source: str | None = None, detail: str = ""):
        self.op = op
        self.source = source
        where = f" at {source}" if source else ""
        super().__init__(f"unsupported op {op}{where}{': ' + detail if detail else ''}")


class CaptureError(FuselmError):
    """torch.export could not trace the model into one graph (a branch on a tensor's
    values, a dynamic dim the model fixes); the message names the model's line."""


class UnsupportedKernelError(FuselmError, NotImplementedError):
    """No kernel of the target can compute a fused group (its ops, dtypes or shapes)."""


class FallbackWarning(UserWarning):
    """A model compiled with fallbacks: ATen ops without an IR mapping (or a group no
    kernel of the target can compute) run through torch instead of generated kernels."""


class IntegrityError(FuselmError):
    """Files on disk do not match the manifest written with them (`fuselm.integrity`):
    a file missing, changed or unexpected, other versions, or no valid manifest."""


class CalibrationWarning(UserWarning):
    """Quantization calibrated on too little data for its method (GPTQ on fewer input
    rows than features): the result fits the samples and may be worse on other inputs."""


class KernelCacheWarning(UserWarning):
    """A kernel cache entry on disk was corrupt or could not be loaded: it was rebuilt."""


class ArtifactError(FuselmError):
    """An ahead-of-time artifact (`fuselm build`) that cannot be built or loaded here: a
    file missing or changed, another format, fuselm/torch/compiler version, target or CPU;
    the message names the problem and, where rebuilding fixes it, the command."""


def one_line(error: BaseException) -> str:
    """An error's message as one line (its lines joined), for command-line reports."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "; ".join(lines) or type(error).__name__
