"""Partition a graph into kernels: the unit codegen sees.

1. Heavy ops (gemm, matmul, norms, attention and the cache ops: the `heavy` flag of the
   op registry) are one kernel each; their fused forms already carry their epilogues.
   So is each fallback op (run by torch).
2. Views (ops with the `view` flag: reshape, permute, slice, select, expand) are free: the runtime applies them to
   tensors without copying, unless their only reader is a fusible op, which then
   reads through the view inside its own kernel.
3. Every other op is fusible: it joins the kernel of each fusible producer whose only
   reader it is (union-find over single-use edges). Each kernel is then a tree whose
   root is the one value read outside it.
4. A kernel becomes a *group*: a small graph whose inputs are everything it reads from
   outside (weights too: constants become typed parameters, so identical layers share
   one kernel) and whose output is its root; a group whose sizes its inputs do not give
   (a mask made from `arange(T)`) also reads a graph input of that size, for its shape. The cache ops get the cache of their own
   layer (`cache_layer`, a [1, ...] view) and `layer=0`, so all layers share a kernel too.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..ir.graph import Graph, GraphBuilder, Node, Value, substitute_symbols
from ..ir.registry import get_op
from ..ir.types import symbol

CACHE_OPS = frozenset({"kv_cache_write", "paged_attention"})


def _alone(op: str) -> bool:
    """A kernel of its own: heavy ops, and fallbacks (run by torch, never fused)."""
    definition = get_op(op)
    return definition.heavy or definition.fallback


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
        return isinstance(n, Node) and not _alone(n.op) and (not get_op(n.op).view or n in absorbed)

    for node in graph.nodes:
        if fusible(node):
            for producer in node.inputs:
                if fusible(producer) and uses.get(producer, 0) == 1:
                    parent[find(producer)] = find(node)
    members: dict = {}
    for node in graph.nodes:
        if get_op(node.op).view and node not in absorbed:
            continue
        members.setdefault(find(node), []).append(node)
    steps = []
    for node in graph.nodes:
        if get_op(node.op).view and node not in absorbed:
            steps.append(ViewStep(node))
        elif find(node) is node:
            steps.append(_group(members[node], node, graph.inputs))
    return steps


def _views_read_inside_kernels(graph: Graph, users: dict) -> set:
    """Views whose only reader is a fusible op (or another such view): done in-kernel."""
    absorbed: set = set()
    for node in reversed(graph.nodes):
        readers = users.get(node, [])
        if get_op(node.op).view and len(readers) == 1 and node not in graph.outputs:
            reader = readers[0]
            if not _alone(reader.op) and (not get_op(reader.op).view or reader in absorbed):
                absorbed.add(node)
    return absorbed


def _group(nodes: list, root: Node, graph_inputs: list) -> KernelGroup:
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
    sources = _size_sources(_whole_products(builder.build([env[root]])), graph_inputs)
    for value in sources:
        param(value)
    graph = canonical_symbols(builder.build([env[root]]))
    return KernelGroup(graph, tuple(params), root, cache_layer, tuple(nodes))


def _size_sources(group: Graph, graph_inputs: list) -> list:
    """Graph inputs that give the sizes a kernel needs and its inputs do not (a mask built
    from `arange(T)` alone, a [B, S] view of [B*S] rows): passed as extra inputs, read for
    their shapes only."""
    known = set().union(*(_readable_symbols(v.type) for v in group.inputs))
    needed = set().union(*(n.type.symbols | _attr_symbols(n) for n in group.nodes)) - known
    sources = []
    for value in graph_inputs:
        if needed & value.type.symbols:
            sources.append(value)
            needed -= value.type.symbols
    return sources


def _readable_symbols(ir_type) -> set:
    """The symbols a kernel can read from a tensor of this type's shape: a bare dim, or an
    expression of one symbol (N+1); not the factors of a product (batch*sequence)."""
    found: set = set()
    for dim in ir_type.shape:
        symbols = getattr(dim, "free_symbols", set())
        if len(symbols) == 1:
            found |= symbols
    return found


def _attr_symbols(node: Node) -> set:
    found: set = set()
    for value in node.attrs.values():
        for item in value if isinstance(value, (list, tuple)) else (value,):
            found |= getattr(item, "free_symbols", set())
    return found


def canonical_symbols(graph: Graph) -> Graph:
    """Rename symbolic dims n0, n1, ... by first appearance in the inputs, so a kernel's
    identity does not depend on what the model called its dimensions (T or R rows).
    A product the group only ever sees whole is one dim first (see `_whole_products`)."""
    graph = _whole_products(graph)
    order: list = []
    for value in graph.inputs:
        for dim in value.type.shape:
            for sym in sorted(getattr(dim, "free_symbols", ()), key=str):
                if sym not in order:
                    order.append(sym)
    return substitute_symbols(graph, {sym: symbol(f"n{i}") for i, sym in enumerate(order)})


def _whole_products(graph: Graph) -> Graph:
    """A dim like batch*sequence whose symbols appear nowhere else in the group (a gemm on
    `view(-1, D)` rows) becomes one symbol: the kernel is the one any [M, D] input gets,
    and its size is read from the input's shape (from a product, it could not split it)."""
    inputs = {dim for v in graph.inputs for dim in v.type.shape}
    products = [d for d in inputs if not isinstance(d, int) and d.is_Mul and len(d.free_symbols) > 1]
    for at, product in enumerate(sorted(products, key=str)):
        parts = product.free_symbols
        if any(d != product and parts & getattr(d, "free_symbols", set()) for d in inputs):
            continue
        merged = substitute_symbols(graph, {product: symbol(f"_whole{at}")})
        if not parts & (set().union(*(v.type.symbols for v in [*merged.inputs, *merged.nodes]))
                        | set().union(*(_attr_symbols(n) for n in merged.nodes))):
            graph = merged
    return graph


def _cache_input(node: Node) -> Value:
    return node.inputs[0] if node.op == "kv_cache_write" else node.inputs[1]
