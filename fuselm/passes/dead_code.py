"""Dead-code elimination.

Walk backwards from the graph outputs, marking every node they need; drop the nodes
nobody marked, and the constants no kept node reads. Outputs are the only roots: a
cache write survives because the updated cache is an output, not because it is special.
"""
from __future__ import annotations

from ..ir.graph import Graph, Node
from .base import counters


def prune(graph: Graph) -> Graph:
    """The graph without dead nodes and unread constants (counts nothing)."""
    live: set = set()
    stack = [v for v in graph.outputs if isinstance(v, Node)]
    while stack:
        node = stack.pop()
        if node not in live:
            live.add(node)
            stack.extend(v for v in node.inputs if isinstance(v, Node))
    nodes = [n for n in graph.nodes if n in live]
    return Graph(list(graph.inputs), nodes, list(graph.outputs), graph.constants).without_unused_constants()


def eliminate_dead_code(graph: Graph) -> Graph:
    result = prune(graph)
    counters["dead_code.nodes"] += len(graph.nodes) - len(result.nodes)
    counters["dead_code.constants"] += len(graph.constants) - len(result.constants)
    return result
