"""pack / unpack (ir/varlen_ops.py) in the lowering table: row gathers, fusible like
index_select.

- pack(x [B, S, *R], tokens i64[T]) -> [T, *R]: out[t, *r] = x[tokens[t] // S, tokens[t] % S, *r];
- unpack(p [T, *R], positions i64[B, S]) -> [B, S, *R]: out[b, s, *r] = p[positions[b, s], *r],
  0 where positions[b, s] < 0 (padding). `if_then_else` evaluates the read only where
  the position is real, so padding reads nothing (not even row 0 of an empty p).

Both are index maps, so the generic schedule inlines them: the elementwise ops around
them (unpack then a mul, an add then pack) compute in the same loop nest.
elementwise.py imports this module, which registers the entries.
"""
from __future__ import annotations

from tvm import tirx

from .build import const
from .lowering import Lowering, lowers


@lowers("pack")
def _pack(ctx: Lowering, node, args):
    x, tokens = args
    per_sequence = ctx.dims(node.inputs[0].type.shape[1])
    index = ctx.dims.index_dtype

    def value(t, *r):
        flat = tokens(t).astype(index)
        return x(tirx.floordiv(flat, per_sequence), tirx.floormod(flat, per_sequence), *r)

    return ctx.compute(node, value)


@lowers("unpack")
def _unpack(ctx: Lowering, node, args):
    packed, positions = args

    def value(b, s, *r):
        row = positions(b, s)
        read = packed(row.astype(ctx.dims.index_dtype), *r)
        return tirx.if_then_else(row >= const(0, row), read, const(0, read))

    return ctx.compute(node, value)
