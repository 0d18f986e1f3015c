"""Remove ops that return their input unchanged (canonical form for later patterns).

Rules are data: op name -> a test on (node, input type) saying the op is a no-op.
A matching node is replaced by its first input.
"""
from __future__ import annotations

from ..ir.graph import Graph, transform
from .base import counters

IDENTITY_RULES = {
    # reshape/expand to the shape it already has
    "reshape": lambda node, x: x.type.same_as(node.type),
    "expand": lambda node, x: x.type.same_as(node.type),
    # cast to the dtype it already has
    "cast": lambda node, x: x.type.dtype == node.attrs["dtype"],
    # permutation that moves nothing
    "permute": lambda node, x: tuple(node.attrs["dims"]) == tuple(range(x.type.rank)),
    # x * 1, x / 1, x + 0, x - 0 (same type only: no broadcast, no promotion)
    "mul": lambda node, x: node.attrs.get("scalar") == 1 and x.type.same_as(node.type),
    "div": lambda node, x: node.attrs.get("scalar") == 1 and not node.attrs.get("reverse") and x.type.same_as(node.type),
    "add": lambda node, x: node.attrs.get("scalar") == 0 and x.type.same_as(node.type),
    "sub": lambda node, x: node.attrs.get("scalar") == 0 and not node.attrs.get("reverse") and x.type.same_as(node.type),
    # concat of one tensor
    "concat": lambda node, x: len(node.inputs) == 1,
}


def remove_identities(graph: Graph) -> Graph:
    def visit(builder, node, inputs):
        rule = IDENTITY_RULES.get(node.op)
        if rule and inputs and rule(node, inputs[0]):
            counters[f"remove_identities.{node.op}"] += 1
            return inputs[0]
        return None

    return transform(graph, visit)
