"""Weights a checkpoint already holds quantized (a GGUF file's Q4_0, Q4_1, Q8_0 tensors),
kept as their parts from the file to the kernels, never widened to floats.

A model is still captured as a torch module, and torch needs a float tensor for each
parameter; a packed weight therefore gives the module a *stand-in*: a float tensor of
the weight's shape over a single NaN (all strides 0), which costs 4 bytes (and makes
the module, run eagerly, say loudly that its weights are not there). The
stand-in flows through capture as the IR constant of its parameter, and
passes/packed_weights.py then replaces each read of it (by its storage, which capture
keeps) with the parts: a gemm reads `dequantize(q, scale[, offset])`, which fold_qgemm
turns into a `qgemm`, and an embedding becomes a `qembedding` of the same parts.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True, eq=False)
class PackedWeight:
    """An [n, k] weight as the parts of one format of ir/quant_ops.py ("int8": q, scale;
    "int4": q, scale, offset), with its float stand-in."""

    format: str
    group_size: int
    parts: dict = field(repr=False)  # part name -> tensor, in the order the ops take them
    shape: tuple  # (n, k)
    dtype: torch.dtype = torch.float32  # the stand-in's: the model's float dtype
    standin: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "standin", torch.full((1,), float("nan"), dtype=self.dtype).expand(*self.shape))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts.values())


def storage_key(tensor: torch.Tensor) -> int:
    """What identifies a stand-in through capture (which detaches, a new tensor object
    over the same storage)."""
    return tensor.untyped_storage().data_ptr()


class PackedWeights(dict):
    """The packed weights of one loaded model, by the storage of their stand-ins (which
    this object keeps alive, so no other tensor can take their addresses)."""

    def __init__(self, weights=()):
        super().__init__((storage_key(w.standin), w) for w in weights)

    def of(self, tensor: torch.Tensor):
        """The PackedWeight whose stand-in `tensor` is (or shares storage with), else None."""
        if tensor.numel() == 0 or any(tensor.stride()) or tensor.device.type == "meta":
            return None
        return self.get(storage_key(tensor))

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in self.values())
