"""Canonical forms, so later patterns see one spelling of each computation.

1. Ops that return their input unchanged are removed. Rules are data: op name -> a test
   on (node, input) saying the op is a no-op; the node is replaced by its input.
2. A reshape of a reshape reads the first one's input directly (and vanishes when the
   shapes then agree), so view chains like Hugging Face's repeat_kv with one group
   collapse.
"""
from __future__ import annotations

from ..ir.graph import Graph, Node, transform
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


def canonicalize(graph: Graph) -> Graph:
    def visit(builder, node, inputs):
        source = inputs[0] if inputs else None
        if node.op == "reshape" and isinstance(source, Node) and source.op == "reshape":
            counters["canonicalize.reshape_chain"] += 1
            source = source.inputs[0]
            if source.type.same_as(node.type):
                return source
            return builder.op("reshape", source, **node.attrs, source=node.source)
        rule = IDENTITY_RULES.get(node.op)
        if rule and inputs and rule(node, source):
            counters[f"canonicalize.{node.op}"] += 1
            return source
        return None

    return transform(graph, visit)
