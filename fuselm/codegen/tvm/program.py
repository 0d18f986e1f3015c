"""The cpu program: a whole partitioned graph as one TVM Relax module, run by Relax's VM.

The Python executor (runtime/executor.py) calls one kernel at a time from a loop: per
launch it binds sizes, allocates the output with torch and crosses into TVM, which costs
more than a decode-sized kernel once there are hundreds of them. Here the same steps
become one Relax function `main(*graph inputs, weights)`:

- each kernel group's scheduled PrimFuncs (the same the emitters build for the kernel
  cache) are functions of the module, called with `call_tir`; the choice each `run`
  makes per call (gemv1 / gemv / gemm by rows, the serial twin below SERIAL_MAX, decode
  or query tiles) is an `If` on the symbolic sizes, decided in the VM, inside a small
  private function of its own (`emit_outlined`: so its result is freed after its last use);
- symbolic dims stay symbolic: one program serves every token and batch count, and
  Relax plans the intermediate memory;
- views are Relax reshapes (free) or small copy kernels lowered like any fused view;
- the KV cache is written in place: `call_tir_inplace` on a `memory.view` of the
  caller's cache (its layer), which the VM receives from torch through DLPack;
- the weights are one tuple argument, converted to TVM tensors once (no copy).

A forward is then one VM call with one `call_tir` per kernel launch and no Python in
between. A group no kernel computes (a fallback op, or ops no emitter takes) is a
`call_pure_packed` of a function `Program.bind` registers under `fallback_name(group)`:
the IR reference, run by torch (the only Python a forward then runs). `build_program`
compiles the module (tvm.compile); vm.py's `Program` runs it (and runs a saved one
without importing tvm); a graph with complex values is refused with
`UnsupportedKernelError` (the Python executor runs it).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import sympy
import torch
import tvm
import tvm.sym
from tvm import relax, tirx

from ...errors import UnsupportedKernelError
from ...ir.graph import Constant, Graph
from ...ir.registry import get_op
from ...ir.types import TensorType
from ...passes.partition import KernelGroup, ViewStep
from ..kernel import group_key
from .build import INDEX, Dims, ShapeBinder, target, tir_dtype
from .vm import Program, fallback_name

_analyzer = tvm.sym.Analyzer()


class ProgramContext:
    """What an emitter's `program_call` uses to place its kernel in the program: sizes of
    the group's symbols in the program's variables, calls, reshapes and choices."""

    def __init__(self, builder: "ProgramBuilder", group: Graph, arg_types: list, outer: "ProgramContext" = None):
        """`arg_types`: the types of what the group's inputs are bound to, in the symbols of
        the graph, or of `outer` (views placed inside a kernel's step)."""
        self.builder = builder
        self.symbols = _symbol_map(group.inputs, arg_types)
        self.outer = outer

    # -- sizes
    def size(self, dim) -> tirx.PrimExpr:
        """A dim of the group (int or expression over its symbols) in program variables."""
        if isinstance(dim, int):
            return tirx.IntImm("int64", dim)
        dim = sympy.sympify(dim).subs(self.symbols)
        return self.outer.size(dim) if self.outer is not None else self.builder.dims(dim)

    def shape(self, ir_type: TensorType) -> list:
        return [self.size(d) for d in ir_type.shape]

    def numel(self, ir_type: TensorType) -> tirx.PrimExpr:
        return self.product(self.shape(ir_type))

    @staticmethod
    def product(sizes: list) -> tirx.PrimExpr:
        return _simplify(functools.reduce(lambda a, b: a * b, sizes, tirx.IntImm("int64", 1)))

    def largest(self, ir_types: list) -> tirx.PrimExpr:
        """The most elements of any of these tensors."""
        return _simplify(functools.reduce(tirx.max, [self.numel(t) for t in ir_types]))

    @staticmethod
    def prim(value) -> relax.Expr:
        return relax.prim_value(tirx.IntImm("int64", value) if isinstance(value, int) else _simplify(value))

    def symbol_args(self, group: Graph) -> list:
        """The group's symbols as prim values, in the order (and index type) the kernels take them."""
        return [relax.prim_value(_simplify(tirx.Cast(INDEX, self.size(s)))) for s in ShapeBinder(group.inputs).symbols]

    # -- calls
    def call(self, function: str, args: list, out: list, dtype: str) -> relax.Call:
        """A (not yet emitted) call_tir of one of the kernel's functions."""
        return relax.call_tir(self.builder.function(function), args, relax.TensorType(out, dtype))

    def call_multi(self, function: str, args: list, outs: list) -> relax.Call:
        """call_tir with several outputs: `outs` is [(shape, dtype)]."""
        return relax.call_tir(self.builder.function(function), args,
                              [relax.TensorType(shape, dtype) for shape, dtype in outs])

    def inplace(self, function: str, args: list, index: int) -> relax.Call:
        """A (not yet emitted) call_tir_inplace: the function writes args[index], which is its result."""
        return relax.call_tir_inplace(self.builder.function(function), args, index, args[index].ty)

    def choose(self, cases: list, otherwise: Callable) -> relax.Expr:
        """The first case whose condition holds: [(condition, make_call)], then `otherwise`.
        A condition the sizes decide statically picks its call without a branch."""
        for at, (condition, make_call) in enumerate(cases):
            condition = _simplify(condition)
            if isinstance(condition, tirx.IntImm):
                if condition.value:
                    return self.builder.emit(make_call())
                continue
            rest = cases[at + 1 :]
            chosen = relax.SeqExpr([], make_call())
            alternative = self._branch_body(rest, otherwise)
            return self.builder.emit_outlined(relax.If(relax.prim_value(condition), chosen, alternative))
        return self.builder.emit(otherwise())

    def _branch_body(self, cases: list, otherwise: Callable) -> relax.Expr:
        for at, (condition, make_call) in enumerate(cases):
            condition = _simplify(condition)
            if isinstance(condition, tirx.IntImm):
                if condition.value:
                    return relax.SeqExpr([], make_call())
                continue
            return relax.SeqExpr([], relax.If(relax.prim_value(condition), relax.SeqExpr([], make_call()),
                                              self._branch_body(cases[at + 1 :], otherwise)))
        return relax.SeqExpr([], otherwise())

    # -- data movement
    def reshape(self, value: relax.Expr, shape: list) -> relax.Expr:
        """A view with another shape (free in the VM: every value is compact)."""
        return self.builder.reshape(value, shape)

    def broadcast(self, value: relax.Expr, shape: list) -> relax.Expr:
        return self.builder.emit(relax.op.broadcast_to(value, relax.ShapeExpr(shape)))

    def item(self, value: relax.Expr, index: int) -> relax.Expr:
        return self.builder.emit(relax.TupleGetItem(value, index))

    def emit(self, expr: relax.Expr) -> relax.Expr:
        return self.builder.emit(expr)

    def empty(self, shape: tuple, dtype: str) -> relax.Expr:
        return relax.const(torch.empty(shape, dtype=getattr(torch, dtype)).numpy(), dtype)


@dataclass
class Stacked:
    """A result that the kernel wrote as several outputs (a residual norm's [2, ...]):
    its `select(dim=0, index=i)` views are the parts."""
    parts: tuple


class ProgramBuilder:
    """Walks a partitioned graph's steps into one Relax function."""

    def __init__(self, graph: Graph, steps: list, plan_of: Callable):
        self.graph, self.steps, self.plan_of = graph, steps, plan_of
        self.dims = Dims("int64")
        self.bb = relax.BlockBuilder()
        self._functions: dict = {}  # name -> GlobalVar
        self._generated: dict = {}  # group key -> (kernel name, funcs)
        self._choices = 0  # private functions emit_outlined made
        self.weight_types = {v.name: v.type for step in steps for v in _reads(step) if isinstance(v, Constant)}
        self.weight_types.update({v.name: v.type for v in graph.outputs if isinstance(v, Constant)})
        self.weight_names = sorted(self.weight_types)
        self.launches = 0  # call_tir per forward, counted as the steps are placed
        self.fallbacks: list = []  # names of the functions groups without a kernel call

    def function(self, name: str) -> relax.GlobalVar:
        return self._functions[name]

    def emit(self, expr: relax.Expr) -> relax.Expr:
        return self.bb.emit(expr)

    def emit_outlined(self, choice: relax.If) -> relax.Expr:
        """A choice between kernel calls, as a call of a private function holding it.

        Emitted in `main` itself, an `If`'s branches allocate their results in registers
        the VM never clears, and Relax's memory planning leaves the values that cross an
        `If` alone: every kernel result of a forward stayed alive until it returned (a
        2,048-token SmolLM2 prefill held 1.5 GB of activations). A function's registers
        go when it returns, and the caller drops its result after its last use as for
        any call; the call costs ~0.2 us more than the branch."""
        choice = self.bb.normalize(choice)
        tensors = list(relax.analysis.free_vars(choice))
        body = relax.SeqExpr([], choice)
        sizes = relax.analysis.free_symbolic_vars(relax.Function(tensors, body, choice.ty))
        params, args = list(tensors), list(tensors)
        if sizes:  # defines the symbols no argument's shape does (a condition's, a kernel's size argument)
            params.append(relax.Var("sizes", relax.ShapeType(values=list(sizes))))
            args.append(relax.ShapeExpr(list(sizes)))
        function = relax.utils.copy_with_new_vars(relax.Function(params, body, choice.ty, is_pure=True))
        name = f"choice{self._choices}"
        self._choices += 1
        callee = self.bb.add_func(function, name)  # private: no global symbol
        return self.bb.emit(relax.Call(callee, args))

    def reshape(self, value: relax.Expr, shape: list) -> relax.Expr:
        """The same memory with another shape: a view (`R.reshape` outside a dataflow block
        would be legalized into a copy kernel)."""
        return self.bb.emit(relax.op.memory.view(value, relax.ShapeExpr(shape)))

    def build_module(self) -> tvm.IRModule:
        params = [relax.Var(_param_name(v.name), self._tensor_type(v.type)) for v in self.graph.inputs]
        weight_types = [self._tensor_type(self.weight_types[n]) for n in self.weight_names]
        weights = relax.Var("weights", relax.TupleType(weight_types))
        with self.bb.function("main", [*params, weights]):
            env: dict = dict(zip(self.graph.inputs, params))
            for at, name in enumerate(self.weight_names):
                env[name] = self.bb.emit(relax.TupleGetItem(weights, at))
            for step in self.steps:
                if isinstance(step, ViewStep):
                    env[step.node] = self._view(step.node, self._read(step.node.inputs[0], env), step.node.inputs[0].type)
                else:
                    env[step.result] = self._kernel_step(step, env)
            outputs = [self._materialized(self._read(v, env)) for v in self.graph.outputs]
            self.bb.emit_func_output(relax.Tuple(outputs))
        return self.bb.get()

    def _tensor_type(self, ir_type: TensorType) -> relax.TensorType:
        return relax.TensorType(self.dims.shape(ir_type.shape), tir_dtype(ir_type.dtype))

    def _read(self, value, env: dict):
        return env[value.name] if isinstance(value, Constant) else env[value]

    # -- kernels
    def _kernel_step(self, step: KernelGroup, env: dict):
        args = [self._read(v, env) for v in step.args]
        try:
            if any(get_op(n.op).fallback for n in step.graph.nodes):
                raise UnsupportedKernelError("a fallback op")
            plan = self.plan_of(step.graph)
            name, funcs = self._funcs(step.graph, plan)
        except UnsupportedKernelError:  # run by torch: the IR reference, through a registered function
            return self._fallback_call(step, args)
        if step.cache_layer is not None:
            at = 0 if step.result.op == "kv_cache_write" else 1
            args[at] = self._cache_layer(args[at], step.args[at].type, step.cache_layer)
        context = ProgramContext(self, step.graph, [v.type for v in step.args])
        if plan.core is step.graph:
            operands = [self._materialized(a) for a in args]
        else:  # the views around the heavy op, then the op alone
            local = dict(zip(step.graph.inputs, args))
            for node in plan.before:
                local[node] = self._view(node, local[node.inputs[0]], node.inputs[0].type, context)
            operands = [self._materialized(local[v]) for v in plan.operands]
            context = ProgramContext(self, plan.core, [v.type for v in plan.operands], outer=context)
        result = plan.emitter.program_call(plan.core, {form: f"{name}__{form}" for form in funcs}, operands, context)
        self.launches += 1
        if step.cache_layer is not None and step.result.op == "kv_cache_write":
            return env[step.args[0]] if not isinstance(step.args[0], Constant) else args[0]
        for node in plan.after:
            result = self._view(node, result, node.inputs[0].type, context)
        return result

    def _fallback_call(self, step: KernelGroup, args: list) -> relax.Expr:
        """A group no kernel computes, as a call of the function `Program.bind` registers
        under `fallback_name(group)` (the compiled model's fallbacks, counted there)."""
        name = fallback_name(step.graph)
        if name not in self.fallbacks:
            self.fallbacks.append(name)
        operands = [self._materialized(a) for a in args]
        return self.bb.emit(relax.call_pure_packed(name, *operands, ty_args=self._tensor_type(step.result.type)))

    def _funcs(self, group: Graph, plan) -> tuple:
        key = group_key(group, "cpu")
        if key not in self._generated:
            name, funcs = plan.emitter.generate(plan.core)
            for form, func in funcs.items():
                gv = self.bb.add_func(func.with_attr("global_symbol", f"{name}__{form}"), f"{name}__{form}")
                self._functions[f"{name}__{form}"] = gv
            self._generated[key] = (name, funcs)
        return self._generated[key]

    def _cache_layer(self, cache: relax.Expr, cache_type: TensorType, layer: int) -> relax.Expr:
        """The [1, ...] view of one layer of the cache, in place (no copy)."""
        shape = self.dims.shape(cache_type.shape)
        per_layer = functools.reduce(lambda a, b: a * b, shape[1:], tirx.IntImm("int64", 1))
        itemsize = torch.empty((), dtype=cache_type.torch_dtype).element_size()
        offset = _simplify(per_layer * itemsize * layer)
        return self.bb.emit(relax.op.memory.view(cache, relax.ShapeExpr([1, *shape[1:]]),
                                                 relative_byte_offset=relax.prim_value(offset)))

    # -- views
    def _view(self, node, value, input_type: TensorType, context: ProgramContext = None):
        """A view step (`context`: of the kernel step it is inside, if it is): reshape is
        free; a part of a stacked result is that output; other views are copy kernels
        (the view lowered as a one-node fused group)."""
        size = context.size if context is not None else self.dims
        if isinstance(value, Stacked):
            if node.op == "select" and node.attrs["dim"] in (0, -input_type.rank):
                return value.parts[node.attrs["index"]]
            value = self._materialized(value)
        if node.op == "reshape":
            return self.reshape(value, [size(d) for d in node.type.shape])
        return self._copy_view(node, value, input_type, context)

    def _copy_view(self, node, value, input_type: TensorType, outer: ProgramContext) -> relax.Expr:
        from ...ir.graph import GraphBuilder
        from ...passes.partition import canonical_symbols
        from . import elementwise

        builder = GraphBuilder()
        x = builder.input("x", input_type)
        out = builder.op(node.op, x, **node.attrs)
        group = canonical_symbols(builder.build([out]))
        name, funcs = self._funcs(group, _ViewPlan(group, elementwise))
        context = ProgramContext(self, group, [input_type], outer=outer)
        self.launches += 1
        return elementwise.program_call(group, {form: f"{name}__{form}" for form in funcs}, [value], context)

    def _materialized(self, value):
        if isinstance(value, Stacked):
            return self.bb.emit(relax.op.stack(list(value.parts), axis=0))
        return value


@dataclass
class _ViewPlan:
    core: Graph
    emitter: object


def _symbol_map(inputs: list, parent_types: list) -> dict:
    """Group symbol -> the parent's dim expression, read where a group dim is bare."""
    mapping: dict = {}
    for value, parent in zip(inputs, parent_types):
        for dim, parent_dim in zip(value.type.shape, parent.shape):
            if isinstance(dim, sympy.Symbol) and dim not in mapping:
                mapping[dim] = sympy.sympify(parent_dim)
    return mapping


def _reads(step) -> tuple:
    return (step.node.inputs[0],) if isinstance(step, ViewStep) else step.args


def _param_name(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def _simplify(expr):
    return expr if isinstance(expr, (int, bool)) else _analyzer.simplify(expr)


# ----------------------------------------------------------------------------- build
def build_program(graph: Graph, steps: list, plan_of: Callable) -> Program:
    """Compile the graph's steps into one VM executable (vm.py's Program runs it)."""
    if any(v.type.is_complex for v in [*graph.inputs, *graph.nodes]):
        raise UnsupportedKernelError("complex values have no cpu program (the executor runs the graph)")
    builder = ProgramBuilder(graph, steps, plan_of)
    module = builder.build_module()
    executable = tvm.compile(module, target=target())
    return Program(executable.jit(), builder.weight_names, builder.launches, module.script(), builder.fallbacks,
                   executable=executable)
