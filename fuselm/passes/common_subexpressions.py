"""Common-subexpression elimination.

Nodes are visited in order; a node whose (op, inputs, attributes) equals an earlier
node's is replaced by that node. Inputs are compared after replacement, so chains of
duplicates collapse in one sweep. Ops with side effects (cache writes) are never merged.
"""
from __future__ import annotations

from ..ir.graph import Graph, copy_node, transform
from ..ir.registry import get_op
from ..ir.text import format_attrs
from .base import counters


def eliminate_common_subexpressions(graph: Graph) -> Graph:
    seen: dict = {}

    def visit(builder, node, inputs):
        if get_op(node.op).has_side_effect:
            return None
        key = (node.op, tuple(id(v) for v in inputs), format_attrs(node.attrs))
        if key in seen:
            counters["cse.merged"] += 1
            return seen[key]
        seen[key] = copy_node(builder, node, inputs)
        return seen[key]

    return transform(graph, visit)
