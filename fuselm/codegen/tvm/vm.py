"""Runs a built cpu program (program.py) with TVM's runtime library alone: importing and
using this module does not import the `tvm` package.

`import tvm` costs ~2-3 s (its compiler library, Relax, TIR, ml_dtypes), which is most
of the time an artifact takes to start serving, and running a program needs none of it:
`tvm_ffi` (the calling convention, ~0.1 s) loads the program's shared library, and
`libtvm_runtime.so` from the tvm wheel (loaded with RTLD_GLOBAL, as `import tvm` loads
it: the same library, loaded once) provides the Relax VM and the thread pool. This is
what `relax.VirtualMachine(module, tvm.cpu())` does, in four calls:
`load_module(path)["vm_load_executable"]()` then `vm_initialization(device type, device
id, allocator)` per device.

`tvm_ffi` imports `ml_dtypes` if it can (~0.8 s, numpy dtypes for bfloat16 and fp8);
fuselm hands tensors to TVM through DLPack, never as numpy arrays, so that import is held
off while tvm_ffi loads and works normally afterwards.

A `Program` is built by program.py (`build_program`, which compiles it in this process)
or loaded from what `save` wrote; `bind` gives it its weights and registers the
functions its fallback calls run, and `program(*inputs)` is one VM call.
"""
from __future__ import annotations

import ctypes
import functools
import importlib.util
import json
import sys
import threading
from pathlib import Path

import torch

from ...ir.graph import Graph
from ...passes.partition import KernelGroup
from ..kernel import group_key
from ..memory import kernel_ready

LIBRARY, DESCRIPTION, SCRIPT = "program.so", "program.json", "program.relax"
_CPU_DEVICE = 1  # DLPack's kDLCPU
# relax.VirtualMachine.NAIVE_ALLOCATOR: each storage is malloc'd and freed, and the C
# library reuses freed memory for any later size. The pooled allocator keeps every freed
# buffer for a later request of its exact size and never returns one, so a server's
# memory grew with each distinct token count it ran (SmolLM2: +5 MB a prompt length);
# decode speed is the same with either (interleaved runs).
_NAIVE_ALLOCATOR = 1


@functools.cache
def ffi():
    """`tvm_ffi`, with TVM's runtime library (the Relax VM, the thread pool) loaded."""
    hold_off = "ml_dtypes" not in sys.modules and "tvm_ffi" not in sys.modules
    if hold_off:
        sys.modules["ml_dtypes"] = None  # `import ml_dtypes` raises ImportError: tvm_ffi goes on without it
    try:
        import tvm_ffi
    finally:
        if hold_off:
            del sys.modules["ml_dtypes"]
    spec = importlib.util.find_spec("tvm")  # finds the package without importing it
    library = Path(spec.origin).parent / "lib" / "libtvm_runtime.so" if spec and spec.origin else None
    if library is None or not library.exists():
        raise ImportError(f"TVM's runtime library is not where the apache-tvm wheel puts it ({library})")
    ctypes.CDLL(str(library), ctypes.RTLD_GLOBAL)
    return tvm_ffi


def fallback_name(group: Graph) -> str:
    """The global function a program calls for a group no kernel computes."""
    return f"fuselm.fallback.{group_key(group, 'cpu')}"


class Program:
    """A built program and the VM that runs it: `program(*inputs)` once `bind`.
    Its `name` and `ops` are what the kernel cache's marker records."""

    name = "program"
    ops: tuple = ()

    def __init__(self, library, weight_names: list, launches: int, script: str = "", fallbacks: list = (),
                 executable=None):
        """`library`: the compiled module (a tvm_ffi Module holding `vm_load_executable`);
        `executable`: the relax.VMExecutable it came from when built here (what `save` exports)."""
        self.library, self.executable = library, executable
        self.weight_names, self.launches, self.script = weight_names, launches, script
        self.fallbacks = list(fallbacks)  # the registered functions it calls (groups without a kernel)
        self.vm = self._main = self._weights = None  # made by `bind` (the VM resolves its functions then)
        self._lock = threading.Lock()  # a VM runs one call at a time (its frames are its own state)
        self.calls = 0  # forwards run (tests read it: one VM call per forward)

    def bind(self, constants: dict, steps: list) -> "Program":
        """Ready to run: the weights as TVM tensors sharing torch's memory (converted once),
        and each fallback group's IR reference registered under the name the program calls."""
        tvm_ffi = ffi()
        self._weights = tvm_ffi.convert([tvm_ffi.from_dlpack(kernel_ready(constants[name]))
                                         for name in self.weight_names])
        groups = {fallback_name(s.graph): s.graph for s in steps if isinstance(s, KernelGroup)}
        for name in self.fallbacks:
            tvm_ffi.register_global_func(name, _torch_function(groups[name]), override=True)
        self.vm = self.library["vm_load_executable"]()
        self.vm["vm_initialization"](_CPU_DEVICE, 0, _NAIVE_ALLOCATOR)
        self._main = self.vm["main"]
        return self

    def __call__(self, *inputs):
        if self._weights is None:
            raise RuntimeError("Program.bind must be called before the program runs")
        inputs = [kernel_ready(t) for t in inputs]
        with self._lock:
            self.calls += 1
            results = self._main(*inputs, self._weights)
        return tuple(torch.from_dlpack(r) for r in results)

    def set_instrument(self, instrument) -> None:
        """Call `instrument(function, name, before_run, result, *args)` around every
        function the VM calls (relax.VirtualMachine.set_instrument); return 0 to go on."""
        self.vm["set_instrument"](instrument)

    def save(self, directory) -> None:
        """program.so (export_library), program.json (weights, launches), program.relax."""
        if self.executable is None:
            raise RuntimeError("a loaded program is saved by copying its directory")
        directory = Path(directory)
        self.executable.export_library(str(directory / LIBRARY))
        (directory / DESCRIPTION).write_text(json.dumps({"weights": self.weight_names, "launches": self.launches,
                                                        "fallbacks": self.fallbacks}))
        (directory / SCRIPT).write_text(self.script)

    @staticmethod
    def load(directory) -> "Program":
        """What `save` wrote, without building anything (and without importing tvm)."""
        directory = Path(directory)
        description = json.loads((directory / DESCRIPTION).read_text())
        library = ffi().load_module(str(directory / LIBRARY))
        script = (directory / SCRIPT).read_text() if (directory / SCRIPT).exists() else ""
        return Program(library, description["weights"], description["launches"], script,
                       description.get("fallbacks", []))


def _torch_function(group: Graph):
    """The group's IR reference (torch) as a function of TVM tensors, for the VM."""
    from ...ir.interpreter import interpret

    def run(*tensors):
        result = interpret(group, *(torch.from_dlpack(t) for t in tensors))
        return ffi().from_dlpack(kernel_ready(result))

    return run
