"""The `cpu` target: TVM kernels generated from fused groups.

`emit(group[, directory])` picks the emitter for the group, builds one TVM module for
the group's symbolic sizes and returns a `Kernel` whose `run(*tensors)` computes what
`ir.interpret(group, *tensors)` computes. `run` allocates the output with torch and
hands torch's storage to TVM through DLPack: no copies (tvm_ffi takes torch tensors as
arguments directly). The Kernel's `source` is the scheduled TVMScript; its
`extra_sources` hold the LLVM IR ("ll") and the assembly ("s"). With a directory,
`emit` also writes <name>.so (the compiled module) and <name>.tir/.ll/.s there, and
`load(group, directory)` returns the same kernel from those files without generating
anything (the kernel cache's backend contract). `build_count()` says how many modules
this process built: a new size of a symbolic dim builds nothing.

Emitters, one file per kind of group, each with `generate(group) -> (name, {function:
PrimFunc})` and `make_run(group, functions) -> run`:
  gemm.py         gemm with its epilogue; GEMV forms for few rows, a packed GEMM above
  qgemm.py        qgemm (a quantized weight: int8 / int4 / nf4, weight-only or W8A8, with
                  outlier features) with gemm's epilogue: GEMV forms that dequantize in
                  registers, a tiled form that unpacks panels per parallel block
  matmul.py       matmul (torch.matmul, batch dims broadcast): packed panels of b, a
                  register-tiled micro-kernel; b read in place when given transposed
  norm.py         rms_norm / layer_norm, optionally with the residual add
  elementwise.py  any group of pointwise, view, reduction, gather, rope and attention
                  ops: lowering.py holds the op -> TE table (attention.py adds attention,
                  varlen_lowering.py pack / unpack),
                  then one generic schedule
  paged.py        paged_attention and kv_cache_write, in TVMScript (data-dependent loops)
  varlen.py       varlen_attention (packed sequences, no padding), in TVMScript
A gemm, qgemm, matmul, norm or cache op may come with views (reshape, permute, ...) of its
inputs before it and of its result after it: `run` applies those to the torch tensors.
kernels.py picks the emitter and makes the Kernel; build.py is what emitters share.

Whole graphs: program.py builds a partitioned graph into one Relax VM program, vm.py
runs one (`PROGRAMS` below is their kernel-cache backend).

This package is the only part of fuselm that imports tvm, and importing it does not:
`emit`, `load` and `build_count` import the builder (and tvm) on first use; host.py
(the CPU kernels are built for) and vm.py (running a saved program) never import it,
so loading an artifact with a program starts in a fraction of the time.
"""
from __future__ import annotations

import os

# One pool owns the cores: TVM's. By default it starts half the logical CPUs (it assumes
# hyperthreads), which on a 2-vCPU machine is one thread; it reads this when it starts.
os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))

from pathlib import Path  # noqa: E402

from ...ir.graph import Graph  # noqa: E402
from ..cache import register_key_setting  # noqa: E402
from . import host  # noqa: E402

register_key_setting(__name__, lambda: f"mcpu={host.mcpu()}")  # kernels built for two CPUs never share a key

__all__ = ["emit", "load", "build_count", "PROGRAMS"]


def __getattr__(name: str):
    """`emit`, `load` and `build_count` import the kernel builder (and tvm) on first use."""
    if name in ("emit", "load"):
        from . import kernels

        return getattr(kernels, name)
    if name == "build_count":
        from .build import build_count

        return build_count
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _ProgramBackend:
    """The kernel cache's backend contract for whole-graph programs (program.py): keyed by
    the graph's text (weights are arguments, so their values are not part of it). `load`
    runs the saved program through TVM's runtime library alone (vm.py): no tvm import."""

    @staticmethod
    def key(graph: Graph, target: str, versions: tuple) -> str:
        import hashlib

        from ...ir.text import print_graph

        return hashlib.sha256(f"program\n{target}\n{versions}\n{print_graph(graph)}".encode()).hexdigest()[:16]

    @staticmethod
    def emit(graph: Graph, directory: Path):
        from ...passes.partition import partition
        from .kernels import plan_of
        from .program import build_program

        program = build_program(graph, partition(graph), plan_of)
        program.save(directory)
        return program

    @staticmethod
    def load(graph: Graph, directory: Path):
        from .vm import Program

        return Program.load(directory)


PROGRAMS = _ProgramBackend()
