"""Bounds checks of the indices a call passes in, before any kernel reads with them.

Eager torch raises `IndexError: index out of range in self` for an embedding id past the
table; a generated kernel would read past the buffer (garbage, or a crash). Every graph
input that reaches the index operand of embedding, index_select, gather or qembedding
(or the slots, block tables and context lengths of the paged cache ops) through views
and casts alone (token ids, the common case) is checked on each call with one min/max
pass over it, a few microseconds against the forward it guards. Indices the
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

PASS_THROUGH = {"cast"}  # besides views: ops that keep each index's value


@dataclass(frozen=True)
class IndexCheck:
    input_index: int  # which of the call's tensors
    bound: object  # a Dim: valid indices are low <= i < bound
    reader: str  # the op (and the model line) that indexes with it
    low: bool = True  # False: any negative is allowed (a padding slot the op skips)


class IndexBounds:
    def __init__(self, graph: Graph):
        self.inputs = graph.inputs
        position = {value: i for i, value in enumerate(graph.inputs)}
        checks = {}
        for node in graph.nodes:
            found = _index_operand(node)
            for index, bound, low in found:
                source = _through_views(index)
                if isinstance(source, Input):
                    where = f"{node.op} at {node.source}" if node.source else node.op
                    check = IndexCheck(position[source], bound, where, low)
                    checks.setdefault((position[source], str(bound), low), check)
        self.checks = list(checks.values())

    def check(self, tensors: tuple) -> None:
        """Raise IndexError naming the input and the op when an index is out of range."""
        if not self.checks:
            return
        sizes = None
        for check in self.checks:
            tensor = tensors[check.input_index]
            if tensor.numel() == 0:
                continue
            if isinstance(check.bound, int):
                bound = check.bound
            else:
                sizes = sizes if sizes is not None else bind_symbols(self.inputs, tensors)
                bound = evaluate_dim(check.bound, sizes)
            low, high = (int(v) for v in torch.aminmax(tensor))
            if (check.low and low < 0) or high >= bound:
                bad = low if check.low and low < 0 else high
                allowed = f"0..{bound - 1}" if check.low else f"at most {bound - 1} (negative: skipped)"
                raise IndexError(f"index out of range: {self.inputs[check.input_index].name} holds {bad}, and "
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


def _through_views(value):
    while isinstance(value, Node) and (get_op(value.op).view or value.op in PASS_THROUGH):
        value = value.inputs[0]
    return value
