"""Weights several passes build: concatenations of constants, with readable names."""
from __future__ import annotations

import torch


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
