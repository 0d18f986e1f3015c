"""Weights several passes build: concatenations of constants, with readable names, and
of gemm weights that are dequantized constants (a packed checkpoint's, see
passes/packed_weights.py), concatenated part by part."""
from __future__ import annotations

from typing import Optional

import torch

from ..ir.graph import Constant, Node


def concatenated_name(names: list) -> str:
    """`a.b.gate_proj.weight` + `a.b.up_proj.weight` -> `a.b.gate_proj+up_proj.weight`."""
    split = [n.split(".") for n in names]
    head = 0
    while all(len(p) > head + 1 and p[head] == split[0][head] for p in split):
        head += 1
    tail = 0
    while all(len(p) > head + tail + 1 and p[-1 - tail] == split[0][-1 - tail] for p in split):
        tail += 1
    middles = ["_".join(p[head : len(p) - tail]) for p in split]
    return ".".join(split[0][:head] + ["+".join(middles)] + (split[0][len(split[0]) - tail :] if tail else []))


def concatenated_constant(builder, constants: list, dim: int = 0):
    """A new constant holding the given constants (values of `builder`) concatenated."""
    tensor = torch.cat([builder.constants[c.name] for c in constants], dim=dim)
    return builder.constant(builder.fresh_constant_name(concatenated_name([c.name for c in constants])), tensor)


def dequantized_weight(w) -> tuple:
    """(the dequantize node, the dtype it is cast to or None) of a gemm weight that is
    `dequantize(constants...)` (optionally cast), else (None, None)."""
    dtype = None
    if isinstance(w, Node) and w.op == "cast":
        w, dtype = w.inputs[0], w.attrs["dtype"]
    if isinstance(w, Node) and w.op == "dequantize" and all(isinstance(v, Constant) for v in w.inputs):
        return w, dtype
    return None, None


def is_gemm_weight(w) -> bool:
    """A weight fusion may concatenate: a constant or a dequantized one."""
    return isinstance(w, Constant) or dequantized_weight(w)[0] is not None


def concatenated_weight(builder, weights: list) -> Optional[object]:
    """Gemm weights [N_i, K] (values of the graph being rewritten) stacked along N in the
    new graph: constants concatenated; dequantized weights of one format, group size and
    K (no outlier columns) become one dequantize of their parts concatenated row by row
    (scales run along K, so rows stack). None when they are neither."""
    if all(isinstance(w, Constant) for w in weights):
        return concatenated_constant(builder, [builder.adopt(w) for w in weights])
    found = [dequantized_weight(w) for w in weights]
    first, dtype = found[0]
    same = ("format", "group_size", "k", "outliers")
    if first is None or first.attrs.get("outliers") or any(
            d is None or t != dtype or len(d.inputs) != len(first.inputs)
            or any(d.attrs.get(a) != first.attrs.get(a) for a in same) for d, t in found):
        return None
    parts = [concatenated_constant(builder, [builder.adopt(d.inputs[i]) for d, _ in found])
             for i in range(len(first.inputs))]
    attrs = {**first.attrs, "n": sum(d.attrs["n"] for d, _ in found)}
    result = builder.op("dequantize", *parts, source=first.source, **attrs)
    return result if dtype is None else builder.op("cast", result, dtype=dtype, source=first.source)
