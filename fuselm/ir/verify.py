"""The verifier: ops exist, arities and types check, SSA order holds, outputs are defined.

Errors name the offending node in its text form, e.g.
`%5 = add(%3, %9) : f32[T,576]: %9 is used before it is defined`.
"""
from __future__ import annotations

from .graph import Constant, Graph, Input, Node
from .registry import IRTypeError, infer_type
from .text import format_node, value_names
from .types import TensorType


class IRVerificationError(ValueError):
    """The graph is malformed; the message names the node."""


def verify(graph: Graph) -> Graph:
    """Check `graph`; returns it unchanged, or raises IRVerificationError."""
    names = value_names(graph)
    defined = set(graph.inputs)
    if len({v.name for v in graph.inputs}) != len(graph.inputs):
        raise IRVerificationError("graph inputs have duplicate names")
    for node in graph.nodes:
        where = format_node(node, names)
        for value in node.inputs:
            _check_defined(value, defined, graph, f"{where}: input {_name(value, names)}")
        try:
            expected = infer_type(node.op, [v.type for v in node.inputs], node.attrs)
        except IRTypeError as err:
            raise IRVerificationError(f"{where}: {err}") from None
        if not expected.same_as(node.type):
            raise IRVerificationError(f"{where}: type says {node.type} but the op infers {expected}")
        defined.add(node)
    for i, value in enumerate(graph.outputs):
        _check_defined(value, defined, graph, f"output {i} ({_name(value, names)})")
    return graph


def _name(value, names) -> str:
    return f"@{value.name}" if isinstance(value, Constant) else names.get(value, "<a value outside this graph>")


def _check_defined(value, defined: set, graph: Graph, what: str) -> None:
    if isinstance(value, Constant):
        if value.name not in graph.constants:
            raise IRVerificationError(f"{what} names a constant the graph does not hold")
        if not TensorType.of(graph.constants[value.name]).same_as(value.type):
            raise IRVerificationError(f"{what} has type {value.type} but its tensor is {TensorType.of(graph.constants[value.name])}")
    elif value not in defined:
        kind = "is used before it is defined" if isinstance(value, Node) and value in graph.nodes else "is not defined in this graph"
        raise IRVerificationError(f"{what} {kind}")
