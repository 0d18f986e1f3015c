"""Fuse sibling gemms: gemms reading one input become one gemm over concatenated weights.

q/k/v projections (and any other gemms of one activation with constant weights and no
epilogue) read their input once: `gemm(x, [Wq; Wk; Wv])`, and each original result
becomes a column slice of the fused output (a view, free at run time). The fused gemm
is placed at the first sibling, so every reader of a slice comes after it.
"""
from __future__ import annotations

from ..ir.graph import Constant
from .patterns import Any, Const, Op, Rule, rewrite
from .weights import concatenated_constant


def _is_plain_gemm(node, x) -> bool:
    return (
        node.op == "gemm"
        and node.inputs[0] is x
        and len(node.inputs) == 2
        and isinstance(node.inputs[1], Constant)
        and not node.attrs.get("epilogue")
    )


def _fuse(builder, m):
    x, first = m.old("x"), m.old("gemm")
    siblings = [u for u in m.users.get(x, []) if _is_plain_gemm(u, x)]
    siblings = [s for s in siblings if s.inputs[1].type.dtype == first.inputs[1].type.dtype]
    if len(siblings) < 2 or siblings[0] is not first:
        return None
    weights = [builder.adopt(s.inputs[1]) for s in siblings]
    fused = builder.op("gemm", m.x, concatenated_constant(builder, weights), source=first.source)
    replaced, start = {}, 0
    for sibling in siblings:
        width = sibling.type.shape[-1]
        replaced[sibling] = builder.op("slice", fused, dim=fused.type.rank - 1, start=start, end=start + width, step=1, source=sibling.source)
        start += width
    return replaced


RULES = [
    # gemm(x, W1), gemm(x, W2), ... -> slices of gemm(x, [W1; W2; ...])
    Rule("siblings", Op("gemm", Any("x"), Const("w"), bind="gemm", epilogue=lambda e: not e), _fuse),
]


def fuse_sibling_gemms(graph):
    return rewrite(graph, RULES, "fuse_sibling_gemms")
