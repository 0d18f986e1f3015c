"""Turning generated kernel source into an importable module, and the names it uses.

Triton reads a kernel's source with `inspect`, so each generated kernel is written to
`kernel_dir/<name>.py` and imported from that path. A module is imported once per
process per source text: identical groups give identical source and share it.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from ...errors import UnsupportedKernelError

# IR dtype -> its spelling in generated host code (torch) and in kernels (Triton)
TORCH_NAMES = {
    "f64": "torch.float64", "f32": "torch.float32", "f16": "torch.float16", "bf16": "torch.bfloat16",
    "i64": "torch.int64", "i32": "torch.int32", "i16": "torch.int16", "i8": "torch.int8",
    "u8": "torch.uint8", "bool": "torch.bool",
}
TRITON_NAMES = {
    "f64": "tl.float64", "f32": "tl.float32", "f16": "tl.float16", "bf16": "tl.bfloat16",
    "i64": "tl.int64", "i32": "tl.int32", "i16": "tl.int16", "i8": "tl.int8",
    "u8": "tl.uint8", "bool": "tl.int1",
}

# The preamble every generated module starts with (after its docstring).
IMPORTS = '''import os

import torch
import triton
import triton.language as tl

# Triton's interpreter (TRITON_INTERPRET=1, CPU tests) multiplies bf16 tiles as raw
# integers in tl.dot; kernels there get fp32 copies of bf16 dot operands instead.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
'''

_loaded: dict[str, ModuleType] = {}


def number_token(value: float) -> str:
    """A float as a piece of an identifier: 1e-05 -> '1em05', 0.125 -> '0p125'."""
    return repr(float(value)).replace("-", "m").replace("+", "").replace(".", "p")


def dot_precision(dtype: str) -> str:
    """tl.dot's extra argument: fp32 tiles stay fp32 (torch does not use TF32 by default)."""
    return ', input_precision="ieee"' if dtype == "f32" else ""


def load_module(name: str, source: str, kernel_dir: Path) -> tuple[ModuleType, Path]:
    """Write `source` to `kernel_dir/<name>.py` and import it (once per source text)."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:12]
    kernel_dir = Path(kernel_dir)
    kernel_dir.mkdir(parents=True, exist_ok=True)
    path = kernel_dir / f"{name}.py"
    if not path.exists() or path.read_text() != source:
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(source)
        os.replace(partial, path)  # atomic: another process never imports half a file
    module = _loaded.get(digest)
    if module is not None and Path(module.__file__).exists():  # not a moved staging copy
        return module, path
    module_name = f"fuselm_kernels.{name}_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # Triton looks kernels' globals up through their module
    spec.loader.exec_module(module)
    _loaded[digest] = module
    return module, path


def torch_dtype_name(dtype: str) -> str:
    if dtype not in TORCH_NAMES:
        raise UnsupportedKernelError(f"no Triton kernels for dtype {dtype}")
    return TORCH_NAMES[dtype]



@dataclass(frozen=True)
class GeneratedKernel:
    """What an emitter generates for one op: the module body around `def launch`."""

    name: str  # an identifier naming what it computes; also the file name
    summary: str  # one line for the module docstring
    body: str  # helpers, the @triton.jit kernel and `def launch(...)`, the host wrapper
    params: tuple  # launch's parameter names, one per input of the op


OMIT = "@omit@"  # an optional template line that is absent renders as OMIT and is dropped


def optional(condition: bool, text: str) -> str:
    return text if condition else OMIT


def drop_omitted(text: str) -> str:
    return "\n".join(line for line in text.split("\n") if line.strip() != OMIT)
