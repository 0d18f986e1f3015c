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

This package is the only part of fuselm that imports tvm.
"""
from __future__ import annotations

import os

# One pool owns the cores: TVM's. By default it starts half the logical CPUs (it assumes
# hyperthreads), which on a 2-vCPU machine is one thread; it reads this when it starts.
os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))

from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Optional  # noqa: E402

from ...errors import UnsupportedKernelError
from ...ir.graph import Graph, Input, Node  # noqa: E402
from ...ir.interpreter import concrete_attr  # noqa: E402
from ...ir.registry import get_op, is_view  # noqa: E402
from ..kernel import Kernel, group_key  # noqa: E402
from .build import ShapeBinder, build, build_count, load_built  # noqa: E402

__all__ = ["emit", "load", "build_count", "PROGRAMS"]


def emit(group: Graph, directory: Optional[Path] = None) -> Kernel:
    """Generate and build the cpu kernel of `group` (saved into `directory` if given)."""
    plan = _plan(group)
    name, funcs = plan.emitter.generate(plan.core)
    built = build(funcs)
    if directory is not None:
        built = built.save(directory, name)
    return _kernel(plan, name, built)


def load(group: Graph, directory: Path) -> Kernel:
    """The kernel `emit(group, directory)` saved there, loaded without generating."""
    plan = _plan(group)
    libraries = sorted(Path(directory).glob("*.so"))
    if len(libraries) != 1:
        raise FileNotFoundError(f"{directory} should hold one compiled kernel, it holds {[f.name for f in libraries]}")
    name = libraries[0].stem
    return _kernel(plan, name, load_built(directory, name))


@dataclass
class _Plan:
    group: Graph
    core: Graph  # what the emitter compiles: the group, or its one heavy op without the views
    emitter: object  # the emitter module
    before: tuple = ()  # views applied to the inputs, in torch
    after: tuple = ()  # views applied to the kernel's result, in torch
    operands: tuple = ()  # the values the core reads, in the core's input order


def _plan(group: Graph) -> _Plan:
    from . import elementwise, gemm, matmul, norm, paged, qgemm, varlen

    if group.constants:
        raise ValueError("a kernel group takes its weights as inputs; it holds no constants")
    if len(group.outputs) != 1:
        raise UnsupportedKernelError(f"a kernel group has one output, this one has {len(group.outputs)}")
    single = {op: m for m in (gemm, matmul, norm, paged, qgemm, varlen) for op in m.OPS}
    ops = [node.op for node in group.nodes]
    if len(ops) == 1 and ops[0] in single:
        return _Plan(group, group, single[ops[0]])
    if all(op in elementwise.OPS and op not in single for op in ops):
        return _Plan(group, group, elementwise)
    heavy = [node for node in group.nodes if not is_view(node.op)]
    if len(heavy) == 1 and heavy[0].op in single:
        return _with_views(group, heavy[0], single[heavy[0].op])
    raise UnsupportedKernelError(f"no cpu emitter for a group of {ops}")


def _with_views(group: Graph, core: Node, emitter) -> _Plan:
    """The heavy op alone as the core group; the views around it stay for `run`."""
    at = group.nodes.index(core)
    chain = group.nodes[at:]
    if any(b.inputs[0] is not a for a, b in zip(chain, chain[1:])) or group.outputs[0] is not chain[-1]:
        raise UnsupportedKernelError("the views after the kernel must be a chain from its result to the output")
    operands = tuple(dict.fromkeys(core.inputs))
    params = [Input(f"in{i}", v.type) for i, v in enumerate(operands)]
    inner = Node(core.op, tuple(params[operands.index(v)] for v in core.inputs), core.attrs, core.type, core.source)
    return _Plan(group, Graph(params, [inner], [inner]), emitter, tuple(group.nodes[:at]), tuple(chain[1:]), operands)


def _kernel(plan: _Plan, name: str, built) -> Kernel:
    run = plan.emitter.make_run(plan.core, built.functions)
    if plan.core is not plan.group:
        run = _views_around(plan, run)
        name = f"{name}_views{group_key(plan.group, 'cpu')[:6]}"
    ops = tuple(node.op for node in plan.group.nodes)
    return Kernel(name, "cpu", built.script, "tir", run, ops=ops, extra_sources=built.extra_sources,
                  source_path=built.source_path)


def _views_around(plan: _Plan, core_run):
    binder = ShapeBinder(plan.group.inputs)

    def view(node, value, bindings):
        attrs = {k: concrete_attr(v, bindings) for k, v in node.attrs.items()}
        return get_op(node.op).reference(value, **attrs)

    def run(*args):
        bindings = binder.bindings(args)
        env = dict(zip(plan.group.inputs, args))
        for node in plan.before:
            env[node] = view(node, env[node.inputs[0]], bindings)
        result = core_run(*(env[v] for v in plan.operands))
        for node in plan.after:
            result = view(node, result, bindings)
        return result

    return run


class _ProgramBackend:
    """The kernel cache's backend contract for whole-graph programs (program.py): keyed by
    the graph's text (weights are arguments, so their values are not part of it)."""

    @staticmethod
    def key(graph: Graph, target: str, versions: tuple) -> str:
        import hashlib

        from ...ir.text import print_graph

        return hashlib.sha256(f"program\n{target}\n{versions}\n{print_graph(graph)}".encode()).hexdigest()[:16]

    @staticmethod
    def emit(graph: Graph, directory: Path):
        from ...passes.partition import partition
        from .program import build_program

        program = build_program(graph, partition(graph), _plan)
        program.save(directory)
        return program

    @staticmethod
    def load(graph: Graph, directory: Path):
        from .program import Program

        return Program.load(directory)


PROGRAMS = _ProgramBackend()
