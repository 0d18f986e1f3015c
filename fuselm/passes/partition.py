"""Partition a graph into kernels: the unit codegen sees.

1. Heavy ops (gemm, matmul, norms, attention and the cache ops) are one kernel each;
   their fused forms already carry their epilogues.
2. Views (reshape, permute, slice, select, expand) are free: the runtime applies them to
   tensors without copying, unless their only reader is a fusible op, which then
   reads through the view inside its own kernel.
3. Every other op is fusible: it joins the kernel of each fusible producer whose only
   reader it is (union-find over single-use edges). Each kernel is then a tree whose
   root is the one value read outside it.
4. A kernel becomes a *group*: a small graph whose inputs are everything it reads from
   outside (weights too: constants become typed parameters, so identical layers share
   one kernel) and whose output is its root. The cache ops get the cache of their own
   layer (`cache_layer`, a [1, ...] view) and `layer=0`, so all layers share a kernel too.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..ir.graph import Graph, GraphBuilder, Node, Value, substitute_symbols
from ..ir.types import symbol

HEAVY_OPS = frozenset({"gemm", "matmul", "layer_norm", "rms_norm", "attention", "paged_attention", "kv_cache_write"})
VIEW_OPS = frozenset({"reshape", "permute", "slice", "select", "expand"})
CACHE_OPS = frozenset({"kv_cache_write", "paged_attention"})


@dataclass(eq=False)
class KernelGroup:
    graph: Graph  # inputs x0, x1, ...; one output
    args: tuple  # the parent graph's values bound to graph.inputs, in order
    result: Node  # the parent node whose value the kernel computes
    cache_layer: Optional[int] = None  # cache ops: which layer's [1, ...] cache view to pass
    nodes: tuple = field(default=())  # the parent nodes it fused

    @property
    def ops(self) -> tuple:
        return tuple(n.op for n in self.graph.nodes)


@dataclass(eq=False)
class ViewStep:
    node: Node  # a view the runtime applies to its input tensor


def partition(graph: Graph) -> list:
    """Kernels and views in execution order."""
    uses = graph.use_counts()
    users = graph.users()
    absorbed = _views_read_inside_kernels(graph, users)
    parent = {n: n for n in graph.nodes}

    def find(n):
        while parent[n] is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    def fusible(n) -> bool:
        return isinstance(n, Node) and n.op not in HEAVY_OPS and (n.op not in VIEW_OPS or n in absorbed)

    for node in graph.nodes:
        if fusible(node):
            for producer in node.inputs:
                if fusible(producer) and uses.get(producer, 0) == 1:
                    parent[find(producer)] = find(node)
    members: dict = {}
    for node in graph.nodes:
        if node.op in VIEW_OPS and node not in absorbed:
            continue
        members.setdefault(find(node), []).append(node)
    steps = []
    for node in graph.nodes:
        if node.op in VIEW_OPS and node not in absorbed:
            steps.append(ViewStep(node))
        elif find(node) is node:
            steps.append(_group(members[node], node))
    return steps


def _views_read_inside_kernels(graph: Graph, users: dict) -> set:
    """Views whose only reader is a fusible op (or another such view): done in-kernel."""
    absorbed: set = set()
    for node in reversed(graph.nodes):
        readers = users.get(node, [])
        if node.op in VIEW_OPS and len(readers) == 1 and node not in graph.outputs:
            reader = readers[0]
            if reader.op not in HEAVY_OPS and (reader.op not in VIEW_OPS or reader in absorbed):
                absorbed.add(node)
    return absorbed


def _group(nodes: list, root: Node) -> KernelGroup:
    inside = set(nodes)
    builder = GraphBuilder()
    params: dict = {}
    cache_layer = root.attrs.get("layer") if root.op in CACHE_OPS else None

    def param(value: Value) -> Value:
        if value not in params:
            vtype = value.type
            if cache_layer is not None and value is _cache_input(root):
                vtype = vtype.with_shape((1,) + vtype.shape[1:])
            params[value] = builder.input(f"x{len(params)}", vtype)
        return params[value]

    env: dict = {}
    for node in nodes:
        inputs = tuple(env[v] if v in inside else param(v) for v in node.inputs)
        attrs = dict(node.attrs, layer=0) if cache_layer is not None else node.attrs
        env[node] = builder.op(node.op, *inputs, **attrs)
    graph = canonical_symbols(builder.build([env[root]]))
    return KernelGroup(graph, tuple(params), root, cache_layer, tuple(nodes))


def canonical_symbols(graph: Graph) -> Graph:
    """Rename symbolic dims n0, n1, ... by first appearance in the inputs, so a kernel's
    identity does not depend on what the model called its dimensions (T or R rows)."""
    order: list = []
    for value in graph.inputs:
        for dim in value.type.shape:
            for sym in sorted(getattr(dim, "free_symbols", ()), key=str):
                if sym not in order:
                    order.append(sym)
    return substitute_symbols(graph, {sym: symbol(f"n{i}") for i, sym in enumerate(order)})


def _cache_input(node: Node) -> Value:
    return node.inputs[0] if node.op == "kv_cache_write" else node.inputs[1]
