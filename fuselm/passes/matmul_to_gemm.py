"""Linear layers written as matmuls become gemms (the IR's linear: weight [N, K]).

`x @ W.t()` is `matmul(x, permute(@W))`: the gemm reads @W as it is, no copy. A matmul
by a 2-d constant C [K, N] (`x @ W` with W stored [in, out], or a transpose that
constant folding already made) reads a new constant Cᵀ [N, K], transposed once here. core ATen's
spelling of a linear over 3-d activations, reshape(mm(reshape(x, [M, K]), W), [..., N]),
becomes one gemm over the output's leading dims (gemm takes any), so its epilogue sees
the [..., N] result the bias and residual adds read. Runs before constant folding, so the
common `x @ W.t()` never copies W; fuse_epilogue then sees these gemms (bias add,
activation, residual) as it sees nn.Linear's.
"""
from __future__ import annotations

import math

import sympy
import torch

from ..ir.types import as_dim, dims_equal
from .patterns import Any, Const, Op, Rule, rewrite

TRANSPOSE = (1, 0)


def _has_rows(value) -> bool:
    return value.type.rank >= 2


def _linear(builder, m):
    x, w = m.old("x"), m.old("w")
    if w.type.dtype != x.type.dtype:
        return None
    return builder.op("gemm", m.x, m.w, source=m.old("mm").source)


def _constant_weight(builder, m):
    x, c = m.old("x"), m.old("c")
    if c.type.rank != 2 or c.type.dtype != x.type.dtype:
        return None
    return builder.op("gemm", m.x, _transposed_constant(builder, m.c), source=m.old("mm").source)


def _transposed_constant(builder, c):
    """Cᵀ as a constant `<name>.T`, made once however many matmuls read C."""
    tensor = builder.constants[c.name].t()
    name = f"{c.name}.T"
    known = builder.constant_values.get(name)
    if known is not None and torch.equal(builder.constants[name], tensor):
        return known
    return builder.constant(builder.fresh_constant_name(name), tensor.contiguous())


def _product(dims):
    return as_dim(math.prod(dims, start=sympy.Integer(1)))


def _unflattened(builder, m):
    """gemm over out's leading dims (x re-viewed to them, or x itself) when the extras are biases."""
    x, gemm, out = m.old("x"), m.old("gemm"), m.old("out")
    if any(extra.type.rank != 1 for extra in gemm.inputs[2:]):
        return None
    flat_rows, n = gemm.type.shape[0], gemm.type.shape[-1]
    if gemm.type.rank != 2 or not dims_equal(out.type.shape[-1], n) or not dims_equal(_product(out.type.shape[:-1]), flat_rows):
        return None  # the outer reshape does more than unflatten the rows (splits N into heads)
    rows = out.type.shape[:-1] + gemm.inputs[0].type.shape[-1:]
    if x.type.rank == len(rows) and all(dims_equal(a, b) for a, b in zip(x.type.shape, rows)):
        activation = m.x
    else:
        activation = builder.op("reshape", m.x, shape=rows, source=gemm.inputs[0].source)
    inputs = (activation,) + tuple(m._mapped(v) for v in gemm.inputs[1:])
    return builder.op("gemm", *inputs, **gemm.attrs, source=gemm.source)


RULES = [
    # matmul(x, permute(@W, [1, 0])) -> gemm(x, @W)
    Rule("linear", Op("matmul", Any("x", where=_has_rows), Op("permute", Const("w"), dims=TRANSPOSE), bind="mm"), _linear),
    # matmul(x, @C) with C [K, N] -> gemm(x, @Cᵀ)
    Rule("constant_weight", Op("matmul", Any("x", where=_has_rows), Const("c"), bind="mm"), _constant_weight),
    # reshape(gemm(reshape(x, [M, K]), w[, bias]), [..., N]) -> gemm(x viewed as [..., K], w[, bias])
    Rule("flattened_rows", Op("reshape", Op("gemm", Op("reshape", Any("x")), Any(), bind="gemm", exact_arity=False), bind="out"),
         _unflattened),
]


def matmul_to_gemm(graph):
    return rewrite(graph, RULES, "matmul_to_gemm")
