"""The host side of a group: which nodes a kernel computes, and the generated `run`.

A group is the kernel's compute nodes, optionally with view ops (reshape, permute,
slice, select, expand) on its inputs before them and on its output after them. The
views cost nothing on the device: `run` applies them to the torch tensors (q, k and v
as column slices of one fused qkv output, reshaped to heads, stay strided views) and
the kernels take strides, so no copy is made where torch can express a view.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy

from ...errors import UnsupportedKernelError
from ...ir.graph import Graph, Input, Node
from ...ir.registry import is_view
from ...ir.types import dim_str


@dataclass
class GroupPlan:
    prologue: list  # view nodes over the group's inputs, in order
    compute: list  # the nodes the kernel computes, in order
    compute_inputs: list  # the values the kernel reads (group inputs or prologue views)
    epilogue: list  # view nodes from the kernel's result to the group's output

    def is_plain(self, group: Graph) -> bool:
        """Whether the kernel reads exactly the group's inputs, in order, and returns its output."""
        same = len(self.compute_inputs) == len(group.inputs) and all(a is b for a, b in zip(self.compute_inputs, group.inputs))
        return same and not self.prologue and not self.epilogue


def plan_group(group: Graph, single_node_ops: tuple) -> GroupPlan:
    """Split a group into views before, compute nodes, views after."""
    prologue, rest = [], []
    for node in group.nodes:
        is_prologue = is_view(node.op) and all(isinstance(v, Input) or v in prologue for v in node.inputs)
        (prologue if is_prologue else rest).append(node)
    epilogue = []
    while rest and is_view(rest[-1].op) and len(rest) > 1:
        epilogue.insert(0, rest.pop())
    compute = rest
    if not compute:
        raise UnsupportedKernelError("a group of views only has nothing for a kernel to compute")
    _check_chain(group, compute, epilogue)
    if len(compute) == 1 and compute[0].op in single_node_ops:
        inputs = list(compute[0].inputs)
    else:
        inside = set(compute)
        reads = dict.fromkeys(v for n in compute for v in n.inputs if v not in inside)
        reads.update(dict.fromkeys(_size_sources(group, list(reads), compute)))  # read for their shapes only
        order = {v: i for i, v in enumerate(group.inputs + prologue)}  # the group's order where it can
        inputs = sorted(reads, key=order.__getitem__)
    return GroupPlan(prologue, compute, inputs, epilogue)


def _size_sources(group: Graph, reads: list, compute: list) -> list:
    """Group inputs whose shapes give sizes the kernel uses that no value it reads has as
    a dimension of its own (a view flattened them into a product, or nothing reads them)."""
    def bare(values):
        return {d for v in values for d in v.type.shape if isinstance(d, sympy.Symbol)}

    used = set().union(*(n.type.symbols for n in compute))
    for node in compute:
        for value in node.attrs.values():
            for item in value if isinstance(value, (list, tuple)) else (value,):
                used |= getattr(item, "free_symbols", set())
    missing, sources = used - bare(reads), []
    for value in group.inputs:
        if missing & bare([value]):
            sources.append(value)
            missing -= bare([value])
    return sources


def _check_chain(group: Graph, compute: list, epilogue: list) -> None:
    chain = [compute[-1]] + epilogue
    for before, after in zip(chain, chain[1:]):
        if after.inputs[0] is not before:
            raise UnsupportedKernelError(f"{after.op} after the kernel does not read its result")
    if group.outputs[0] is not chain[-1]:
        raise UnsupportedKernelError("the group's output is not its last node")


def run_source(group: Graph, plan: GroupPlan, params: tuple) -> str:
    """`run(*inputs)`: the group's entry point; `launch` itself when there are no views."""
    if plan.is_plain(group):
        return "run = launch  # the group is the op itself: inputs in order -> output\n"
    names = _value_names(group, plan, params)
    lines = [f"    {sym} = {names[value]}.shape[{axis}]" for sym, (value, axis) in _symbol_sources(group, plan).items()]
    for node in plan.prologue:
        lines.append(f"    {names[node]} = {view_expression(node, names[node.inputs[0]])}")
    result = f"launch({', '.join(names[v] for v in plan.compute_inputs)})"
    for node in plan.epilogue:
        result = view_expression(node, result)
    args = ", ".join(names[v] for v in group.inputs)
    doc = '    """The group: its inputs (viewed), the kernel, views of its result."""'
    return "\n".join([f"def run({args}):", doc, *lines, f"    return {result}", ""])


def _value_names(group: Graph, plan: GroupPlan, params: tuple) -> dict:
    names: dict = {}
    for value, param in zip(plan.compute_inputs, params):
        if isinstance(value, Input) and value not in names and param not in names.values():
            names[value] = param
    taken = set(names.values())
    for i, value in enumerate(group.inputs):
        if value not in names:  # the next free inN (a kernel parameter may hold this one's)
            names[value] = next(f"in{j}" for j in range(i, i + len(group.inputs) + len(taken) + 1)
                                if f"in{j}" not in taken)
            taken.add(names[value])
    for i, node in enumerate(plan.prologue):
        names[node] = f"view{i}"
    return names


def _symbol_sources(group: Graph, plan: GroupPlan) -> dict:
    """{symbol name: (input, axis)} for the symbols the views' attributes mention."""
    wanted = set()
    for node in plan.prologue + plan.epilogue:
        for value in node.attrs.values():
            for item in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(item, sympy.Expr):
                    wanted |= {str(s) for s in item.free_symbols}
    sources: dict = {}
    for value in group.inputs:
        for axis, dim in enumerate(value.type.shape):
            if isinstance(dim, sympy.Symbol) and str(dim) in wanted:
                sources.setdefault(str(dim), (value, axis))
    missing = wanted - set(sources)
    if missing:
        raise UnsupportedKernelError(f"view attributes use {sorted(missing)}, which no input dimension gives")
    return sources


def _dim(value) -> str:
    text = dim_str(value) if value is not None else "None"
    if "floor" in text or "/" in text:
        raise UnsupportedKernelError(f"view attribute {text} has no plain Python form")
    return text


def view_expression(node: Node, x: str) -> str:
    """The torch expression of view `node` applied to the tensor expression `x`."""
    a = node.attrs
    if node.op in ("reshape", "expand"):
        return f"{x}.{node.op}({', '.join(_dim(d) for d in a['shape'])})"
    if node.op == "permute":
        return f"{x}.permute({', '.join(str(d) for d in a['dims'])})"
    if node.op == "select":
        return f"{x}.select({a['dim']}, {a['index']})"
    if node.op == "slice":
        dim = a["dim"] % node.inputs[0].type.rank
        end = "" if a.get("end") is None else _dim(a["end"])
        step = "" if a.get("step", 1) == 1 else f":{a['step']}"
        return f"{x}[{':, ' * dim}{_dim(a.get('start', 0))}:{end}{step}]"
    raise UnsupportedKernelError(f"not a view op: {node.op}")
