"""Constant folding.

A node whose inputs are all constants (or that has no inputs, like `full` or `arange`
with a static shape) is evaluated once with its reference implementation and replaced
by a new named constant. Side-effecting ops, results with symbolic shapes and transient
ops (a `dequantize` of packed weights is there to be folded into a qgemm, not widened
to floats) stay.
The constants it read are dropped when nothing else reads them.
"""
from __future__ import annotations

from ..ir.graph import Constant, Graph, transform
from ..ir.registry import get_op
from .base import counters


def fold_constants(graph: Graph) -> Graph:
    def visit(builder, node, inputs):
        op = get_op(node.op)
        if op.has_side_effect or op.transient or node.type.symbols or not all(isinstance(v, Constant) for v in inputs):
            return None
        if any(not isinstance(v, (int, float, str, bool, tuple, type(None))) for v in node.attrs.values()):
            return None
        value = op.reference(*(builder.constants[v.name] for v in inputs), **node.attrs)
        stem = f"{inputs[0].name}.{node.op}" if inputs else f"folded.{node.op}"
        counters["constant_folding.folded"] += 1
        return builder.constant(builder.fresh_constant_name(stem), value.contiguous())

    return transform(graph, visit)
