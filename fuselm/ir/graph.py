"""The graph IR: inputs, SSA nodes in order, outputs, and named constants.

Every value is one of three kinds: a graph `Input` (printed `%name`), a `Constant`
(printed `@name`, its tensor held in `Graph.constants`, never in attributes) or the
result of a `Node` (printed `%0`, `%1`, ... by position). Graphs are treated as
immutable: passes build new graphs with `GraphBuilder`, reusing untouched nodes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch

from .types import TensorType, as_dim


class Value:
    """Anything a node can read: an Input, a Constant or a Node's result."""

    type: TensorType


@dataclass(eq=False)
class Input(Value):
    name: str
    type: TensorType

    def __repr__(self) -> str:
        return f"%{self.name}"


@dataclass(eq=False)
class Constant(Value):
    name: str
    type: TensorType

    def __repr__(self) -> str:
        return f"@{self.name}"


@dataclass(eq=False)
class Node(Value):
    op: str
    inputs: tuple
    attrs: dict
    type: TensorType
    # Where the node came from (the model's source line), for error messages and dumps.
    source: Optional[str] = field(default=None, compare=False)

    def __repr__(self) -> str:  # inputs by kind, not recursively (a deep graph's repr stays short)
        inputs = ", ".join(f"Node({v.op})" if isinstance(v, Node) else repr(v) for v in self.inputs)
        return f"Node({self.op}, [{inputs}], {self.attrs}, {self.type})"


@dataclass(eq=False)
class Graph:
    inputs: list
    nodes: list
    outputs: list
    constants: dict = field(default_factory=dict)

    def users(self) -> dict:
        """Map each value to the list of nodes reading it (graph outputs not included)."""
        users: dict = {}
        for node in self.nodes:
            for value in node.inputs:
                users.setdefault(value, []).append(node)
        return users

    def use_counts(self) -> dict:
        """How many times each value is read, graph outputs counted."""
        counts: dict = {}
        for node in self.nodes:
            for value in node.inputs:
                counts[value] = counts.get(value, 0) + 1
        for value in self.outputs:
            counts[value] = counts.get(value, 0) + 1
        return counts

    def without_unused_constants(self) -> "Graph":
        read = {v.name for n in self.nodes for v in n.inputs if isinstance(v, Constant)}
        read |= {v.name for v in self.outputs if isinstance(v, Constant)}
        constants = {name: t for name, t in self.constants.items() if name in read}
        return self if len(constants) == len(self.constants) else Graph(self.inputs, self.nodes, self.outputs, constants)

    def __repr__(self) -> str:  # pytest prints locals of failing tests: a summary, not every tensor
        return (f"<Graph: {len(self.inputs)} inputs, {len(self.nodes)} nodes, {len(self.outputs)} outputs, "
                f"{len(self.constants)} constants>")

    def op_counts(self) -> dict:
        counts: dict = {}
        for node in self.nodes:
            counts[node.op] = counts.get(node.op, 0) + 1
        return counts

    def __str__(self) -> str:
        from .text import print_graph

        return print_graph(self)


class GraphBuilder:
    """Builds a graph node by node, inferring each node's type from the op registry."""

    def __init__(self, constants: Optional[dict] = None):
        self.inputs: list = []
        self.nodes: list = []
        self.constants: dict = {}
        self.constant_values: dict = {}
        self._source_constants = constants or {}

    def input(self, name: str, type: TensorType) -> Input:
        value = Input(name, type)
        self.inputs.append(value)
        return value

    def constant(self, name: str, tensor: Optional[torch.Tensor] = None) -> Constant:
        """The Constant value `@name`; the tensor defaults to the source graph's."""
        if name in self.constant_values:
            return self.constant_values[name]
        if tensor is None:
            tensor = self._source_constants[name]
        self.constants[name] = tensor
        value = Constant(name, TensorType.of(tensor))
        self.constant_values[name] = value
        return value

    def fresh_constant_name(self, stem: str) -> str:
        name, i = stem, 0
        while name in self.constants or name in self._source_constants:
            i += 1
            name = f"{stem}.{i}"
        return name

    def op(self, op: str, *inputs: Value, source: Optional[str] = None, **attrs) -> Node:
        from .registry import infer_type

        attrs = {k: tuple(v) if isinstance(v, list) else v for k, v in attrs.items()}
        node_type = infer_type(op, [v.type for v in inputs], attrs)
        return self.add(Node(op, tuple(inputs), attrs, node_type, source))

    def add(self, node: Node) -> Node:
        """Append an already-typed node (its inputs must be values of this builder)."""
        self.nodes.append(node)
        return node

    def adopt(self, value: Value) -> Value:
        """Bring a constant of the source graph into this one (other values pass through)."""
        if isinstance(value, Constant) and value.name not in self.constant_values:
            self.constants[value.name] = self._source_constants[value.name]
            self.constant_values[value.name] = value
        return self.constant_values.get(value.name, value) if isinstance(value, Constant) else value

    def build(self, outputs: Iterable[Value]) -> Graph:
        return Graph(list(self.inputs), list(self.nodes), list(outputs), dict(self.constants))


def copy_node(builder: GraphBuilder, node: Node, inputs: tuple) -> Node:
    """Add `node` reading `inputs` to the builder, reusing it when its inputs are the same."""
    unchanged = all(a is b for a, b in zip(inputs, node.inputs))
    return builder.add(node if unchanged else Node(node.op, inputs, node.attrs, node.type, node.source))


def transform(graph: Graph, visit) -> Graph:
    """Rebuild `graph`, letting `visit(builder, node, inputs)` replace nodes.

    `inputs` are the node's inputs already mapped into the new graph. `visit` returns
    the value that stands for the node from now on, or None to keep the node (reused
    as is when its inputs did not change). Constants nobody uses are dropped.
    """
    builder = GraphBuilder(graph.constants)
    builder.inputs = list(graph.inputs)
    env: dict = {}

    def mapped(value: Value) -> Value:
        return builder.adopt(value) if isinstance(value, Constant) else env.get(value, value)

    for node in graph.nodes:
        inputs = tuple(mapped(v) for v in node.inputs)
        result = visit(builder, node, inputs)
        env[node] = copy_node(builder, node, inputs) if result is None else result
    return builder.build(mapped(v) for v in graph.outputs).without_unused_constants()


def substitute_symbols(graph: Graph, mapping: dict) -> Graph:
    """The same graph with symbolic dims renamed ({old symbol: new expression})."""
    import sympy

    def sub(value):
        if isinstance(value, sympy.Expr):
            return as_dim(value.xreplace(mapping))
        if isinstance(value, tuple):
            return tuple(sub(v) for v in value)
        return value

    def retyped(t: TensorType) -> TensorType:
        return TensorType(tuple(sub(d) for d in t.shape), t.dtype)

    env = {v: Input(v.name, retyped(v.type)) for v in graph.inputs}
    for node in graph.nodes:
        attrs = {k: sub(v) for k, v in node.attrs.items()}
        env[node] = Node(node.op, tuple(env.get(v, v) for v in node.inputs), attrs, retyped(node.type), node.source)
    return Graph([env[v] for v in graph.inputs], [env[n] for n in graph.nodes], [env.get(v, v) for v in graph.outputs], graph.constants)
