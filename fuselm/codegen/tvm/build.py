"""What every cpu emitter shares: the LLVM target, IR -> TIR types and dimensions,
one build per kernel, and reading a group's symbol values from its arguments.

Kernels are built once for symbolic sizes: each IR symbol (`T`, `N`, ...) becomes a
TIR variable, so a new token count reuses the built module. `build_count()` counts
builds, which tests read to prove that a second size did not trigger codegen.

Kernels are built for the CPU `host.mcpu()` names: this machine's unless `use_mcpu(...)`
names another (host.py, which also keys the kernel cache by it).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import sympy
import tvm
from tvm import tirx

from ...errors import UnsupportedKernelError
from ...ir.graph import Graph, Input
from ...ir.types import evaluate_dim
from .host import mcpu

_built = [0]  # modules built by this process
TIR_DTYPES = {
    "f64": "float64", "f32": "float32", "f16": "float16", "bf16": "bfloat16", "i64": "int64",
    "i32": "int32", "i16": "int16", "i8": "int8", "u8": "uint8", "bool": "bool",
}
INDEX = "int32"  # loop and shape index type (the paged-cache kernels index in int64)
# Below this many output elements a kernel runs its serial twin: waking TVM's thread
# pool costs ~8 us on 2 cores, more than the work (decode-sized pointwise ops, norms).
SERIAL_MAX = 1 << 14


def build_count() -> int:
    """How many TVM modules this process has built."""
    return _built[0]


def target() -> tvm.target.Target:
    return _target_for(mcpu())


@functools.cache
def _target_for(cpu: str) -> tvm.target.Target:
    return tvm.target.Target({"kind": "llvm", "mcpu": cpu, "num-cores": os.cpu_count() or 2})


def vector_lanes() -> int:
    """fp32 lanes of the widest vector register (8 for AVX2, 16 for AVX-512)."""
    return _lanes_for(mcpu())


@functools.cache
def _lanes_for(cpu: str) -> int:
    with _target_for(cpu):
        return 16 if tvm.target.codegen.target_has_features("avx512f", _target_for(cpu)) else 8


def tir_dtype(ir_dtype: str) -> str:
    return TIR_DTYPES[ir_dtype]


def as_expr(value):
    """A te tensor element (`A[i]`) as a plain PrimExpr; other values unchanged."""
    return value.asobject() if hasattr(value, "asobject") else value


def dtype_of(expr) -> str:
    """The TIR dtype of an expression (or a te tensor element), e.g. "float32"."""
    return str(as_expr(expr).ty)


def const(value, like) -> tirx.PrimExpr:
    """`value` as a constant of the dtype of expression `like`."""
    return tirx.const(value, dtype_of(like))


class Dims:
    """IR dimensions as TIR expressions: each sympy symbol becomes one TIR variable."""

    def __init__(self, index_dtype: str = INDEX):
        self.index_dtype = index_dtype
        self.vars: dict = {}  # sympy symbol -> tirx.Var

    def var(self, symbol: sympy.Symbol) -> tirx.Var:
        if symbol not in self.vars:
            self.vars[symbol] = tirx.Var(str(symbol), self.index_dtype)
        return self.vars[symbol]

    def __call__(self, dim):
        """One dimension (int, symbol or expression) as a TIR expression."""
        if isinstance(dim, int):
            return tirx.const(dim, self.index_dtype) if self.index_dtype != "int32" else dim
        return self._expr(sympy.sympify(dim))

    def shape(self, shape) -> list:
        return [self(d) for d in shape]

    def _expr(self, e: sympy.Expr):
        if e.is_Integer:
            return tirx.const(int(e), self.index_dtype)
        if e.is_Symbol:
            return self.var(e)
        if isinstance(e, sympy.floor):
            num, den = sympy.fraction(sympy.together(e.args[0]))
            return tirx.floordiv(self._expr(num), self._expr(den))
        if e.is_Add:
            return functools.reduce(lambda a, b: a + b, (self._expr(a) for a in e.args))
        if e.is_Mul:
            return functools.reduce(lambda a, b: a * b, (self._expr(a) for a in e.args))
        raise UnsupportedKernelError(f"dimension {e} has no TIR form")


class ShapeBinder:
    """Reads the values of a group's symbols from the shapes of its arguments.

    Each symbol is read from the first input dimension that is the bare symbol; a
    symbol seen only inside expressions (`N+1`) is solved from one of them.
    """

    def __init__(self, inputs: list):
        self.symbols = sorted({s for v in inputs for s in v.type.symbols}, key=str)
        self.readers = [self._reader(inputs, s) for s in self.symbols]

    @staticmethod
    def _reader(inputs: list, symbol):
        for i, value in enumerate(inputs):
            for axis, dim in enumerate(value.type.shape):
                if dim == symbol:
                    return lambda args, i=i, axis=axis: args[i].shape[axis]
        for i, value in enumerate(inputs):
            for axis, dim in enumerate(value.type.shape):
                if not isinstance(dim, int) and dim.free_symbols == {symbol}:
                    (solution,) = sympy.solve(sympy.Eq(dim, sympy.Symbol("_size")), symbol)
                    solve = sympy.lambdify(sympy.Symbol("_size"), solution)
                    return lambda args, i=i, axis=axis, solve=solve: int(solve(args[i].shape[axis]))
        raise UnsupportedKernelError(f"symbol {symbol} is not determined by any input dimension")

    def values(self, args) -> tuple:
        return tuple(read(args) for read in self.readers)

    def bindings(self, args) -> dict:
        return dict(zip(self.symbols, self.values(args)))


class OutputShape:
    """The concrete output shape for given symbol values, memoized."""

    def __init__(self, shape, symbols: list):
        self.shape, self.symbols, self._memo = tuple(shape), symbols, {}

    def __call__(self, values: tuple) -> tuple:
        out = self._memo.get(values)
        if out is None:
            bindings = dict(zip(self.symbols, values))
            out = self._memo[values] = tuple(evaluate_dim(d, bindings) for d in self.shape)
        return out


@dataclass
class Built:
    """A compiled module: its functions (`functions[name]`) and its readable sources."""

    functions: object  # a tvm Executable or runtime Module; functions take torch tensors
    script: str  # TVMScript of the scheduled module
    extra_sources: dict  # {"ll": LLVM IR, "s": assembly}
    source_path: Optional[str] = None  # the .tir file, once saved

    def save(self, directory, name: str) -> "Built":
        """Write <name>.so (the compiled module) and its sources into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.functions.export_library(str(directory / f"{name}.so"))
        for ext, text in {"tir": self.script, **self.extra_sources}.items():
            (directory / f"{name}.{ext}").write_text(text)
        return Built(self.functions, self.script, self.extra_sources, str(directory / f"{name}.tir"))


def build(funcs: dict) -> Built:
    """Compile scheduled PrimFuncs ({name: func}) into one module, once."""
    mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})
    executable = tvm.compile(mod, target=target())
    _built[0] += 1
    extra = {fmt: executable.mod.inspect_source(fmt) for fmt in ("ll", "s")}
    return Built(executable, mod.script(), extra)


def load_built(directory, name: str) -> Built:
    """What `Built.save(directory, name)` wrote, loaded again without building."""
    directory = Path(directory)
    library = directory / f"{name}.so"
    if not library.exists():
        raise FileNotFoundError(f"{directory} holds no compiled kernel {library.name}")
    extra = {ext: (directory / f"{name}.{ext}").read_text() for ext in ("ll", "s")}
    module = tvm.runtime.load_module(str(library))
    return Built(module, (directory / f"{name}.tir").read_text(), extra, str(directory / f"{name}.tir"))


def single_node(group: Graph):
    """The group's only node, checked to be its output."""
    if len(group.nodes) != 1 or group.outputs != [group.nodes[0]]:
        raise UnsupportedKernelError(f"expected a group of one node, got {[n.op for n in group.nodes]}")
    return group.nodes[0]


def operand_positions(group: Graph, node) -> list:
    """For each input of `node`, its position among the group's inputs."""
    positions = []
    for value in node.inputs:
        if not isinstance(value, Input) or value not in group.inputs:
            raise UnsupportedKernelError(f"{node.op} reads {value!r}, which is not a group input")
        positions.append(group.inputs.index(value))
    return positions
