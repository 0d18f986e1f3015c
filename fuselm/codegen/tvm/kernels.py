"""The cpu kernel of one fused group: `emit` generates and builds it, `load` reloads what
`emit` saved (the package docstring, codegen/tvm/__init__.py, describes both)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ...errors import UnsupportedKernelError
from ...ir.graph import Graph, Input, Node
from ...ir.interpreter import concrete_attr
from ...ir.registry import get_op, is_view
from ..kernel import Kernel, group_key
from .build import ShapeBinder, build, load_built


def emit(group: Graph, directory: Optional[Path] = None) -> Kernel:
    """Generate and build the cpu kernel of `group` (saved into `directory` if given)."""
    plan = plan_of(group)
    name, funcs = plan.emitter.generate(plan.core)
    built = build(funcs)
    if directory is not None:
        built = built.save(directory, name)
    return _kernel(plan, name, built)


def load(group: Graph, directory: Path) -> Kernel:
    """The kernel `emit(group, directory)` saved there, loaded without generating."""
    plan = plan_of(group)
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


def plan_of(group: Graph) -> _Plan:
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
