"""Rewrite rules as data: a pattern tree, a replacement builder, a one-line comment.

A pattern is `Op(name, *inputs, **attrs)` over sub-patterns, `Any("x")` (binds any
value), `Const("w")` (binds a named constant) and `Scalar()`-free attribute tests:
an attribute given as a callable is a predicate, anything else must be equal.
`Op(..., bind="g")` binds the matched node itself, `commutative=True` tries both input
orders of a binary op.

`rewrite(graph, rules, name)` walks the graph in order, again until nothing changes (it
returns the same graph object when no rule fired). At each node it tries the rules
whose root op matches; interior matched nodes must have no user outside the match (else
fusing would compute them twice); one matched node may feed several matched ones, as
softmax feeds both the isnan and the where of `where(isnan(p), 0, p)`. The first rule that matches and whose builder returns
something wins; a builder returns the value replacing the root, or a dict
{old node: new value} replacing several nodes at once (e.g. a fused norm standing for
both the add and the norm). Replaced nodes are left behind for dead-code elimination.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional

from ..ir.graph import Constant, Graph, GraphBuilder, Node, copy_node
from .base import counters
from .dead_code import prune


@dataclass(frozen=True)
class Any:
    name: Optional[str] = None
    where: Optional[Callable] = None  # predicate on the bound value


@dataclass(frozen=True)
class Const:
    name: str


@dataclass(frozen=True)
class Op:
    op: object  # an op name or a tuple of names
    inputs: tuple = ()
    attrs: dict = field(default_factory=dict)
    bind: Optional[str] = None
    commutative: bool = False
    exact_arity: bool = True

    def __init__(self, op, *inputs, bind=None, commutative=False, exact_arity=True, **attrs):
        object.__setattr__(self, "op", op)
        object.__setattr__(self, "inputs", inputs)
        object.__setattr__(self, "attrs", attrs)
        object.__setattr__(self, "bind", bind)
        object.__setattr__(self, "commutative", commutative)
        object.__setattr__(self, "exact_arity", exact_arity)

    def matches_op(self, op: str) -> bool:
        return op in self.op if isinstance(self.op, tuple) else op == self.op


@dataclass(frozen=True)
class Rule:
    name: str
    pattern: Op
    build: Callable  # build(builder, match) -> Value | dict | None


class Match:
    """Bindings of one match: `m.x` is the NEW value bound to name x; `m.old(x)` the old
    one; `m.users` maps old values to the old nodes reading them."""

    def __init__(self, bindings: dict, nodes: list, mapped: Callable, users: dict):
        self._bindings, self.nodes, self._mapped, self.users = bindings, nodes, mapped, users

    def __getattr__(self, name: str):
        try:
            return self._mapped(self._bindings[name])
        except KeyError:
            raise AttributeError(name) from None

    def old(self, name: str):
        return self._bindings[name]


def _attrs_match(pattern: Op, node: Node) -> bool:
    for key, expected in pattern.attrs.items():
        actual = node.attrs.get(key)
        if callable(expected) and not isinstance(expected, type):
            if not expected(actual):
                return False
        elif actual != expected:
            return False
    return True


def match(pattern, value, bindings: dict, nodes: list) -> bool:
    """Match `pattern` at `value` (an old-graph value), extending bindings and nodes."""
    if isinstance(pattern, Any):
        if pattern.where is not None and not pattern.where(value):
            return False
        return _bind(bindings, pattern.name, value)
    if isinstance(pattern, Const):
        return isinstance(value, Constant) and _bind(bindings, pattern.name, value)
    if not isinstance(value, Node) or not pattern.matches_op(value.op) or not _attrs_match(pattern, value):
        return False
    if pattern.exact_arity and len(value.inputs) != len(pattern.inputs):
        return False
    orders = [value.inputs]
    if pattern.commutative and len(value.inputs) == 2:
        orders.append(value.inputs[::-1])
    for inputs in orders:
        trial_bindings, trial_nodes = dict(bindings), list(nodes)
        if all(match(p, v, trial_bindings, trial_nodes) for p, v in zip(pattern.inputs, inputs)):
            if pattern.bind and not _bind(trial_bindings, pattern.bind, value):
                continue
            bindings.clear(), bindings.update(trial_bindings)
            nodes[:] = trial_nodes + [value]
            return True
    return False


def _bind(bindings: dict, name: Optional[str], value) -> bool:
    if name is None:
        return True
    if name in bindings:
        return bindings[name] is value
    bindings[name] = value
    return True


MAX_SWEEPS = 64  # rules that keep firing (a rewrite undone by another) stop here


def rewrite(graph: Graph, rules: list, pass_name: str) -> Graph:
    """Apply `rules` until none fires (chains like gemm -> bias -> gelu take a sweep per
    link), at most MAX_SWEEPS sweeps; dead nodes are pruned between sweeps so they do not
    count as users. Returns `graph` itself when no rule fired: `result is graph` says
    whether anything changed."""
    result = graph
    for _ in range(MAX_SWEEPS):
        swept, fired = _sweep(result, rules, pass_name)
        if not fired:
            return result
        result = prune(swept)
    return result


def _sweep(graph: Graph, rules: list, pass_name: str) -> tuple:
    """One ordered sweep; counts `<pass_name>.<rule>` per rewrite. (new graph, rewrites)."""
    by_root: dict = {}
    for rule in rules:
        for op in rule.pattern.op if isinstance(rule.pattern.op, tuple) else (rule.pattern.op,):
            by_root.setdefault(op, []).append(rule)
    uses, users = graph.use_counts(), graph.users()
    builder = GraphBuilder(graph.constants)
    builder.inputs = list(graph.inputs)
    env: dict = {}
    fired = 0

    def mapped(value):
        return builder.adopt(value) if isinstance(value, Constant) else env.get(value, value)

    for node in graph.nodes:
        if node in env:  # replaced by an earlier rewrite
            continue
        replaced = _try_rules(by_root.get(node.op, ()), node, uses, users, builder, mapped, pass_name)
        if replaced is None:
            env[node] = copy_node(builder, node, tuple(mapped(v) for v in node.inputs))
        else:
            fired += 1
            env.update(replaced)
    return builder.build(mapped(v) for v in graph.outputs).without_unused_constants(), fired


def _try_rules(rules, node, uses, users, builder, mapped, pass_name) -> Optional[dict]:
    for rule in rules:
        bindings, nodes = {}, []
        if not match(rule.pattern, node, bindings, nodes):
            continue
        reads = Counter(value for n in nodes for value in n.inputs)
        if any(uses.get(n, 0) != reads[n] for n in nodes if n is not node):
            continue  # an interior node read outside the match (or a graph output)
        result = rule.build(builder, Match(bindings, nodes, mapped, users))
        if result is None:
            continue
        counters[f"{pass_name}.{rule.name}"] += 1
        return result if isinstance(result, dict) else {node: result}
    return None
