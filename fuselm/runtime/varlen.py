"""The packing inputs of a pack_varlen graph, computed from its padding mask at each call.

`pack_varlen` (fuselm/passes/pack_varlen.py) adds three graph inputs after the model's
own, named after the mask input m: `m__varlen_tokens`, `m__varlen_positions`,
`m__varlen_cu_seqlens` (see fuselm/ir/varlen_ops.py). The caller passes the padded
batch as before; `PackingInputs` derives those three from m (a few small torch ops on
[B, S]), so a compiled module keeps the model's call signature.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..ir.graph import Graph
from ..ir.varlen_ops import CU_SEQLENS, POSITIONS, TOKENS

SUFFIXES = (TOKENS, POSITIONS, CU_SEQLENS)


def varlen_inputs(mask: torch.Tensor) -> tuple:
    """(tokens i64[T], positions i64[B, S], cu_seqlens i32[B+1]) of a padding mask [B, S]
    (nonzero: a real token), tokens batch-major."""
    keep = (mask != 0).reshape(mask.shape[0], -1)
    tokens = keep.reshape(-1).nonzero().reshape(-1)
    positions = torch.full((keep.numel(),), -1, dtype=torch.int64, device=mask.device)
    positions[tokens] = torch.arange(tokens.numel(), device=mask.device)
    cu_seqlens = torch.zeros(keep.shape[0] + 1, dtype=torch.int32, device=mask.device)
    cu_seqlens[1:] = keep.sum(1).cumsum(0)
    return tokens, positions.reshape(keep.shape), cu_seqlens


class PackingInputs:
    """Where a graph's packing inputs come from: `of(graph)` is None for a graph without
    them; `derive(tensors)` gives them for a call's tensors (the graph's inputs before
    them)."""

    def __init__(self, mask_index: int):
        self.mask_index = mask_index

    @staticmethod
    def of(graph: Graph) -> Optional["PackingInputs"]:
        names = [v.name for v in graph.inputs]
        tail = names[-len(SUFFIXES):]
        if len(tail) < len(SUFFIXES) or not tail[0].endswith(f"__{TOKENS}"):
            return None
        mask = tail[0][: -len(f"__{TOKENS}")]
        if tail != [f"{mask}__{suffix}" for suffix in SUFFIXES] or mask not in names:
            raise ValueError(f"a packed graph's last inputs must be {mask}'s packing inputs, got {tail}")
        return PackingInputs(names.index(mask))

    def derive(self, tensors: tuple) -> tuple:
        return varlen_inputs(tensors[self.mask_index])
