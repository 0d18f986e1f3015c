"""Fuse a residual add into the LayerNorm / RMSNorm that reads it.

`s = a + b; n = norm(s, w...)` where s is also read elsewhere (the residual stream)
becomes one norm with `residual=true`, whose result stacks [norm(a + b), a + b]: the
node replaces the norm by `select(·, 0, 0)` and the add by `select(·, 0, 1)`, so one
kernel reads a and b once and writes both. The fused node is placed at the add, so
every later reader of the sum still sees it defined first.
"""
from __future__ import annotations

from ..ir.graph import Constant
from .patterns import Any, Op, Rule, rewrite

NORMS = ("rms_norm", "layer_norm")


def _norm_reading(m):
    """The norm that reads the add as its x with constant parameters, if any."""
    for user in m.users.get(m.old("sum"), []):
        if user.op in NORMS and user.inputs[0] is m.old("sum") and not user.attrs.get("residual"):
            if all(isinstance(p, Constant) for p in user.inputs[1:]):
                return user
    return None


def _fuse(builder, m):
    norm = _norm_reading(m)
    if norm is None or not (m.a.type.same_as(m.b.type) and m.a.type.same_as(norm.type)):
        return None
    params = tuple(builder.adopt(p) for p in norm.inputs[1:])
    fused = builder.op(norm.op, m.a, *params, m.b, **norm.attrs, residual=True, source=norm.source)
    normed = builder.op("select", fused, dim=0, index=0, source=norm.source)
    total = builder.op("select", fused, dim=0, index=1, source=m.old("sum").source)
    return {m.old("sum"): total, norm: normed}


RULES = [
    # a + b feeding a norm (and read elsewhere too) -> norm(a, w, b) {residual=true}
    Rule("add_norm", Op("add", Any("a"), Any("b"), bind="sum"), _fuse),
]


def fuse_norm(graph):
    return rewrite(graph, RULES, "fuse_norm")
