"""Fuse sibling gemms: gemms reading one input become one gemm over concatenated weights.

q/k/v projections (and any other gemms of one activation with constant weights, or
weights dequantized from constants of one format (passes/weights.py), and no
epilogue or a constant bias only) read their input once: `gemm(x, [Wq; Wk; Wv][, bias])`,
and each original result becomes a column slice of the fused output (a view, free at
run time). Siblings fuse only with their own kind (plain with plain, biased with
biased). The fused gemm is placed at the first sibling, so every reader of a slice
comes after it.
"""
from __future__ import annotations

from ..ir.graph import Constant
from .patterns import Any, Op, Rule, rewrite
from .weights import concatenated_constant, concatenated_weight, is_gemm_weight


def sibling_kind(node, x):
    """"plain" or "bias" for a gemm of x that can fuse with its siblings, else None."""
    if node.op != "gemm" or node.inputs[0] is not x or not is_gemm_weight(node.inputs[1]):
        return None
    epilogue = tuple(node.attrs.get("epilogue", ()))
    if not epilogue and len(node.inputs) == 2:
        return "plain"
    if epilogue == ("bias",) and isinstance(node.inputs[2], Constant):
        return "bias"
    return None


def _fuse(builder, m):
    x, first = m.old("x"), m.old("gemm")
    kind = sibling_kind(first, x)
    if kind is None:  # (a gemm with another epilogue, or a non-constant weight)
        return None
    siblings = [u for u in m.users.get(x, []) if sibling_kind(u, x) == kind]
    siblings = [s for s in siblings if s.inputs[1].type.dtype == first.inputs[1].type.dtype]
    if len(siblings) < 2 or siblings[0] is not first:
        return None
    weights = concatenated_weight(builder, [s.inputs[1] for s in siblings])
    if weights is None:  # dequantized weights of different formats
        return None
    if kind == "bias":
        bias = concatenated_constant(builder, [builder.adopt(s.inputs[2]) for s in siblings])
        fused = builder.op("gemm", m.x, weights, bias, epilogue=("bias",), source=first.source)
    else:
        fused = builder.op("gemm", m.x, weights, source=first.source)
    replaced, start = {}, 0
    for sibling in siblings:
        width = sibling.type.shape[-1]
        replaced[sibling] = builder.op("slice", fused, dim=fused.type.rank - 1, start=start, end=start + width, step=1, source=sibling.source)
        start += width
    return replaced


RULES = [
    # gemm(x, W1[, b1]), gemm(x, W2[, b2]), ... -> slices of gemm(x, [W1; W2; ...][, [b1; b2; ...]])
    Rule("siblings", Op("gemm", Any("x"), Any("w", where=is_gemm_weight), bind="gemm", exact_arity=False), _fuse),
]


def fuse_sibling_gemms(graph):
    return rewrite(graph, RULES, "fuse_sibling_gemms")
