"""Bounds checks of the indices a call passes in, before any kernel reads with them.

Eager torch raises `IndexError: index out of range in self` for an embedding id past the
table; a generated kernel would read past the buffer (garbage, or a crash). Every graph
input that reaches the index operand of embedding, index_select, gather or qembedding
(or the slots, block tables and context lengths of the paged cache ops) through views
and casts alone (token ids, the common case) is checked on each call with one min/max
pass over it, a few microseconds against the forward it guards. The symbolic bounds are
evaluated once per distinct set of input shapes (binding the graph's symbols runs sympy:
milliseconds, as much as a decode step's kernels). Indices the
graph computes itself are in range by construction or by the model's own arithmetic,
as in eager, and are not checked.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ir.graph import Graph, Input, Node
from ..ir.interpreter import bind_symbols
from ..ir.registry import get_op
from ..ir.types import evaluate_dim

PASS_THROUGH = {"cast", "pack"}  # besides views: ops whose values are some of their first input's
REMEMBERED_SHAPES = 256  # input shape sets whose bounds are kept (then forgotten all at once)


@dataclass(frozen=True)
class IndexCheck:
    input_index: int  # which of the call's tensors
    bound: object  # a Dim: valid indices are low <= i < bound
    reader: str  # the op (and the model line) that indexes with it
    low: bool = True  # False: any negative is allowed (a padding slot the op skips)
    wraps: bool = False  # the graph adds `bound` to a negative index first (x[i] in Python): -bound <= i
    offset: int = 0  # the graph indexes with input + offset (ids + 1)


class IndexBounds:
    def __init__(self, graph: Graph):
        self.inputs = graph.inputs
        position = {value: i for i, value in enumerate(graph.inputs)}
        checks = {}
        for node in graph.nodes:
            found = _index_operand(node)
            for index, bound, low in found:
                source, wraps, offset = _through_views(index)
                if isinstance(source, Input):
                    where = f"{node.op} at {node.source}" if node.source else node.op
                    check = IndexCheck(position[source], bound, where, low, wraps, offset)
                    checks.setdefault((position[source], str(bound), low, wraps, offset), check)
        self.checks = list(checks.values())
        self._bounds: dict = {}  # the inputs' shapes -> each check's bound

    def bounds(self, tensors: tuple) -> list:
        """Each check's bound for these inputs' sizes."""
        key = tuple(t.shape for t in tensors)
        found = self._bounds.get(key)
        if found is None:
            symbolic = any(not isinstance(check.bound, int) for check in self.checks)
            sizes = bind_symbols(self.inputs, tensors) if symbolic else {}
            found = [check.bound if isinstance(check.bound, int) else evaluate_dim(check.bound, sizes)
                     for check in self.checks]
            if len(self._bounds) >= REMEMBERED_SHAPES:
                self._bounds.clear()
            self._bounds[key] = found
        return found

    def check(self, tensors: tuple) -> None:
        """Raise IndexError naming the input and the op when an index is out of range."""
        if not self.checks:
            return
        for check, bound in zip(self.checks, self.bounds(tensors)):
            tensor = tensors[check.input_index]
            if tensor.numel() == 0:
                continue
            low, high = (int(v) + check.offset for v in torch.aminmax(tensor))
            least = -bound if check.wraps else 0
            if (check.low and low < least) or high >= bound:
                bad = low if check.low and low < least else high
                allowed = f"{least}..{bound - 1}" if check.low else f"at most {bound - 1} (negative: skipped)"
                holds = f"{bad - check.offset} (+ {check.offset})" if check.offset else str(bad)
                raise IndexError(f"index out of range: {self.inputs[check.input_index].name} holds {holds}, and "
                                 f"{check.reader} takes {allowed}")


def _index_operand(node: Node) -> list:
    """[(index value, its bound, whether negatives are out of range)] of the node's
    index operands."""
    if node.op == "embedding":
        table, ids = node.inputs[:2]
        return [(ids, table.type.shape[0], True)]
    if node.op in ("index_select", "gather"):
        x, index = node.inputs[:2]
        return [(index, x.type.shape[node.attrs["dim"]], True)]
    if node.op == "qembedding":
        return [(node.inputs[0], node.attrs["n"], True)]
    if node.op == "kv_cache_write":  # cache [layers, 2, blocks, block size, heads, dim]
        cache, slots = node.inputs[0], node.inputs[3]
        return [(slots, cache.type.shape[2] * cache.type.shape[3], False)]
    if node.op == "paged_attention":
        cache, tables, lengths = node.inputs[1:4]
        return [(tables, cache.type.shape[2], True), (lengths, tables.type.shape[1] * cache.type.shape[3] + 1, True)]
    return []


def _through_views(value) -> tuple:
    """(the value an index comes from through views, casts, packing, Python's
    negative-index wrap `where(i < 0, i + n, i)` and an added or subtracted int, whether
    it went through that wrap, the int added)."""
    wraps, offset = False, 0
    while isinstance(value, Node):
        scalar = value.attrs.get("scalar")
        if get_op(value.op).view or value.op in PASS_THROUGH:
            value = value.inputs[0]
        elif not wraps and _negative_wrap(value) is not None:
            value, wraps = _negative_wrap(value), True
        elif (not wraps and value.op in ("add", "sub") and len(value.inputs) == 1 and isinstance(scalar, int)
              and not isinstance(scalar, bool) and not value.attrs.get("reverse", False)):
            value, offset = value.inputs[0], offset + (scalar if value.op == "add" else -scalar)
        else:
            break
    return value, wraps, offset


def _negative_wrap(node: Node):
    """i when node is where(lt(i, 0), add(i, n), i), else None."""
    if node.op != "where" or len(node.inputs) != 3:
        return None
    condition, added, index = node.inputs
    if not (isinstance(condition, Node) and condition.op == "lt" and condition.inputs == (index,)
            and condition.attrs.get("scalar") == 0):
        return None
    if not (isinstance(added, Node) and added.op == "add" and added.inputs == (index,) and "scalar" in added.attrs):
        return None
    return index
