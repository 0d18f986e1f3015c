"""`quantize=`: a scheme name with its defaults, or a `QuantizeConfig` setting the rest.

    "int8"        weight-only int8, one scale per output channel
    "w8a8"        int8 weights and int8 activations (per-token dynamic scales), with
                  SmoothQuant's migration x / s, W * s (s_j = max|x_j|^alpha / max|W_j|^(1-alpha))
    "int4-g32", "int4-g64", "int4-g128"
                  weight-only 4-bit, a scale and an offset (the group's minimum) per group
    "llm.int8"    LLM.int8(): input features whose calibrated max |x| exceeds `threshold`
                  stay floating point, the rest is int8 x int8
    "nf4"         QLoRA's NormalFloat-4, an absmax scale per group of 64
    "int8-gptq", "int4-g32-gptq", "int4-g64-gptq", "int4-g128-gptq", "nf4-gptq"
                  the weight-only schemes' formats and bytes, rounded by GPTQ (quant/gptq.py)
                  against calibration inputs instead of to the nearest grid point (on
                  SmolLM2, int8's mean KL to fp32 0.0049 -> 0.0011, top-1 95.6% -> 98.3%)
    "gguf"        no quantization of fuselm's own: a GGUF file's Q4_0 / Q4_1 / Q8_0
                  tensors served as the file holds them (models/gguf_loader.py; the model
                  is loaded with packed=True, which fuselm.LLM and the CLI do)

Which gemms: every gemm whose weight is a constant, except those whose weight name
matches a `skip` pattern (fnmatch over the graph's constant names, e.g.
"model.layers.0.*"); the pattern "lm_head" stands for the output projection: a gemm whose
weight is named like one or is also an embedding table (a tied one). The 4-bit schemes
skip it by default, as llama.cpp, AWQ and bitsandbytes do.

Calibration (w8a8 and llm.int8 need activation statistics, GPTQ X^T X of each gemm's input): `calibration=` is an
iterable of sample inputs (positional argument tuples for `fuselm.compile`, texts or
token lists for `fuselm.LLM`); by default the example inputs of `compile`, or for
language models an English text every Python has (pydoc_data.topics).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any, Optional, Union

WEIGHT_ONLY = ("int8", "int4-g32", "int4-g64", "int4-g128", "nf4")
GPTQ = "-gptq"  # the suffix of a weight-only scheme rounded by GPTQ
SCHEMES = ("int8", "w8a8", "int4-g32", "int4-g64", "int4-g128", "llm.int8", "nf4", *(s + GPTQ for s in WEIGHT_ONLY))
ROUNDINGS = ("nearest", "gptq")
PACKED = "gguf"  # the scheme that quantizes nothing: the checkpoint's packed weights
FORMAT_OF = {"int8": "int8", "w8a8": "int8", "llm.int8": "int8", "int4": "int4", "nf4": "nf4", PACKED: None}
NEEDS_CALIBRATION = ("w8a8", "llm.int8")
DEFAULT_GROUP = {"int4": 32, "nf4": 64}
LM_HEAD = "lm_head"


@dataclass(frozen=True)
class QuantizeConfig:
    """scheme: a name of SCHEMES ("int4" takes `group_size`); group_size: weights per
    scale along K (None: the scheme's default; per output channel for the int8 schemes);
    alpha: SmoothQuant's migration strength (w8a8); threshold: LLM.int8's outlier
    magnitude; skip: weight-name patterns left in floating point (None: the scheme's
    default); calibration: sample inputs (see the module docstring); packed: the loaded
    model's packed weights ("gguf"; quant/packed.py); rounding: "nearest" or "gptq"
    (a weight-only scheme; a name ending in -gptq sets it)."""

    scheme: str
    group_size: Optional[int] = None
    alpha: float = 0.5
    threshold: float = 6.0
    skip: Optional[tuple] = None
    calibration: Any = field(default=None, compare=False, repr=False)
    packed: Any = field(default=None, compare=False, repr=False)
    rounding: str = "nearest"

    def __post_init__(self):
        if isinstance(self.scheme, str) and self.scheme.endswith(GPTQ):
            object.__setattr__(self, "scheme", self.scheme[:-len(GPTQ)])
            object.__setattr__(self, "rounding", "gptq")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {self.rounding!r}")
        match = re.fullmatch(r"int4-g(\d+)", self.scheme) if isinstance(self.scheme, str) else None
        if match:
            if self.group_size not in (None, int(match.group(1))):
                raise ValueError(f"quantize {self.scheme!r} has group size {match.group(1)}, not group_size={self.group_size}")
            object.__setattr__(self, "scheme", "int4")
            object.__setattr__(self, "group_size", int(match.group(1)))
        if self.scheme not in FORMAT_OF:
            raise ValueError(f"unknown quantization scheme {self.scheme!r}; the schemes are "
                             f"{', '.join(SCHEMES + (PACKED,))}")
        if self.scheme == PACKED and (self.group_size is not None or self.skip or self.calibration is not None):
            raise ValueError("quantize='gguf' serves the file's tensors as they are: group_size, skip and "
                             "calibration do not apply")
        size = self.group_size if self.group_size is not None else DEFAULT_GROUP.get(self.scheme)
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
            raise ValueError(f"group_size must be a positive int, got {size!r}")
        if size is not None and self.scheme in ("int4", "nf4") and size % 32:
            raise ValueError(f"a {self.scheme} group_size must be a multiple of 32, got {size}")
        if size is not None and self.scheme in ("w8a8", "llm.int8"):
            raise ValueError(f"{self.scheme} scales weights per output channel; group_size does not apply")
        object.__setattr__(self, "group_size", size)
        if self.rounding == "gptq" and self.scheme not in ("int8", "int4", "nf4"):
            raise ValueError(f"GPTQ rounds the weight-only schemes ({', '.join(WEIGHT_ONLY)}), not {self.scheme}")
        if not (isinstance(self.alpha, (int, float)) and 0.0 <= self.alpha <= 1.0):
            raise ValueError(f"alpha must be a number in [0, 1], got {self.alpha!r}")
        if not (isinstance(self.threshold, (int, float)) and self.threshold > 0):
            raise ValueError(f"threshold must be a positive number, got {self.threshold!r}")
        skip = self.skip if self.skip is not None else ((LM_HEAD,) if self.scheme in ("int4", "nf4") else ())
        if isinstance(skip, str) or not all(isinstance(p, str) for p in skip):
            raise TypeError(f"skip must be a list of weight-name patterns, got {self.skip!r}")
        object.__setattr__(self, "skip", tuple(skip))

    @property
    def format(self) -> str:
        return FORMAT_OF[self.scheme]

    @property
    def activations(self) -> str:
        return "int8" if self.scheme in ("w8a8", "llm.int8") else "float"

    @property
    def loads_packed(self) -> bool:
        """Whether the model must be loaded with its packed weights (models.load(packed=True))."""
        return self.scheme == PACKED

    @property
    def needs_calibration(self) -> bool:
        return self.scheme in NEEDS_CALIBRATION or self.rounding == "gptq"

    @property
    def name(self) -> str:
        """The scheme as a string again ("int4-g32", "int8-gptq")."""
        name = f"int4-g{self.group_size}" if self.scheme == "int4" else self.scheme
        return name + GPTQ if self.rounding == "gptq" else name

    def with_calibration(self, calibration) -> "QuantizeConfig":
        return replace(self, calibration=calibration)

    def with_packed(self, packed) -> "QuantizeConfig":
        return replace(self, packed=packed)


def loads_packed(quantize: Union[None, str, QuantizeConfig]) -> bool:
    """Whether `quantize=` serves a checkpoint's packed weights ("gguf"); refuses a bad value."""
    config = quantize_config(quantize)
    return config is not None and config.loads_packed


def quantize_config(quantize: Union[None, str, QuantizeConfig]) -> Optional[QuantizeConfig]:
    """`quantize=` as a QuantizeConfig (None and "none": no quantization)."""
    if quantize is None or quantize == "none":
        return None
    if isinstance(quantize, QuantizeConfig):
        return quantize
    if isinstance(quantize, str):
        return QuantizeConfig(quantize)
    raise TypeError(f"quantize must be a scheme name ({', '.join(SCHEMES + (PACKED,))}) or a fuselm.QuantizeConfig, "
                    f"got {type(quantize).__name__}")
