"""The op registry: every IR op is registered once, with type inference and a reference.

The reference is plain torch and defines what the op means; the interpreter runs it,
and every pass and kernel is tested against it. An op that updates a buffer in place
names the input it aliases (`aliases_input`): its result is that buffer, updated.

Flags that partition and both backends read (one place, not a list per layer):
  view      the result is a view of input 0 (reshape, permute, ...): no kernel of its own
  heavy     a kernel of its own (gemm, norms, attention...), never fused into another
  fallback  run by calling into torch (the `aten` op), never by a generated kernel
  transient lives only between two passes that always run together (quantize inserts
            `dequantize` / `quantize_dynamic`, fold_qgemm folds them into `qgemm`): no
            kernel of its own; its reference runs it if a pipeline stops in between
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from .types import TensorType


class IRTypeError(TypeError):
    """An op was given inputs or attributes it cannot accept."""


@dataclass(frozen=True)
class OpDef:
    name: str
    infer: Callable[[list, dict], TensorType]
    reference: Callable
    min_inputs: int
    max_inputs: int
    aliases_input: Optional[int] = None
    view: bool = False
    heavy: bool = False
    fallback: bool = False
    transient: bool = False
    pointwise: bool = False  # each output element from the inputs' elements at its index (broadcast)

    @property
    def has_side_effect(self) -> bool:
        return self.aliases_input is not None


OPS: dict[str, OpDef] = {}


def register(name: str, infer, reference, inputs=1, aliases_input: Optional[int] = None, *,
             view: bool = False, heavy: bool = False, fallback: bool = False, transient: bool = False,
             pointwise: bool = False) -> None:
    """Register op `name`; `inputs` is a count or a (min, max) range (max None: variadic)."""
    low, high = inputs if isinstance(inputs, tuple) else (inputs, inputs)
    if name in OPS:
        raise ValueError(f"op {name!r} registered twice")
    OPS[name] = OpDef(name, infer, reference, low, high if high is not None else 1 << 30, aliases_input,
                      view, heavy, fallback, transient, pointwise)


def all_ops() -> dict:
    """Every registered op, by name."""
    from . import core_ops, quant_ops, varlen_ops  # noqa: F401

    return dict(OPS)


def is_view(op: str) -> bool:
    return get_op(op).view


def is_heavy(op: str) -> bool:
    return get_op(op).heavy


def is_fallback(op: str) -> bool:
    return get_op(op).fallback


def get_op(name: str) -> OpDef:
    from . import core_ops, quant_ops, varlen_ops  # noqa: F401  (register the ops on first use)

    if name not in OPS:
        raise IRTypeError(f"unknown op {name!r}")
    return OPS[name]


def infer_type(name: str, input_types: list, attrs: dict) -> TensorType:
    op = get_op(name)
    if not op.min_inputs <= len(input_types) <= op.max_inputs:
        raise IRTypeError(f"{name} takes {op.min_inputs}..{op.max_inputs} inputs, got {len(input_types)}")
    return op.infer(list(input_types), dict(attrs))
