"""Canonical forms, so later patterns see one spelling of each computation.

1. Ops that return their input unchanged are removed. Rules are data: op name -> a test
   on (node, input) saying the op is a no-op; the node is replaced by its input.
2. A reshape of a reshape reads the first one's input directly (and vanishes when the
   shapes then agree), so view chains like Hugging Face's repeat_kv with one group
   collapse.
3. A binary op with a one-element constant operand of the other operand's dtype takes it
   as its `scalar` attribute (`reverse=True` when it is the left operand), as torch's
   capture spells `x * 0.5`: ONNX graphs hold such numbers as 0-d initializers, and
   kernels then see a literal (`pow` by 3.0 becomes two multiplies, not exp/log).
4. GELU written out becomes the `gelu` op, so fuse_epilogue puts it in the gemm:
   x·½·(1 + erf(x/√2)) (exact; ONNX exports of F.gelu, BERT's) and
   x·½·(1 + tanh(√(2/π)·(x + 0.044715·x³))) (approximate="tanh"; GPT-2's NewGELU), with
   the ½ on x, on the sum or on the product.
"""
from __future__ import annotations

import math

from ..ir.core_ops import SCALAR_FORM_OPS
from ..ir.graph import Constant, Graph, Node, transform
from ..ir.registry import IRTypeError, infer_type
from .base import counters
from .patterns import Any, Op, Rule, rewrite

IDENTITY_RULES = {
    # reshape/expand to the shape it already has
    "reshape": lambda node, x: x.type.same_as(node.type),
    "expand": lambda node, x: x.type.same_as(node.type),
    # cast to the dtype it already has
    "cast": lambda node, x: x.type.dtype == node.attrs["dtype"],
    # permutation that moves nothing
    "permute": lambda node, x: tuple(node.attrs["dims"]) == tuple(range(x.type.rank)),
    # x * 1, x / 1, x + 0, x - 0 (same type only: no broadcast, no promotion)
    "mul": lambda node, x: node.attrs.get("scalar") == 1 and x.type.same_as(node.type),
    "div": lambda node, x: node.attrs.get("scalar") == 1 and not node.attrs.get("reverse") and x.type.same_as(node.type),
    "add": lambda node, x: node.attrs.get("scalar") == 0 and x.type.same_as(node.type),
    "sub": lambda node, x: node.attrs.get("scalar") == 0 and not node.attrs.get("reverse") and x.type.same_as(node.type),
    # b & True, b | False
    "logical_and": lambda node, x: node.attrs.get("scalar") is True and x.type.same_as(node.type),
    "logical_or": lambda node, x: node.attrs.get("scalar") is False and x.type.same_as(node.type),
    # concat of one tensor
    "concat": lambda node, x: len(node.inputs) == 1,
}


def canonicalize(graph: Graph) -> Graph:
    def visit(builder, node, inputs):
        source = inputs[0] if inputs else None
        if node.op == "reshape" and isinstance(source, Node) and source.op == "reshape":
            counters["canonicalize.reshape_chain"] += 1
            source = source.inputs[0]
            if source.type.same_as(node.type):
                return source
            return builder.op("reshape", source, **node.attrs, source=node.source)
        scalar_form = _scalar_form(builder, node, inputs)
        if scalar_form is not None:
            counters["canonicalize.scalar_operand"] += 1
            node, inputs, source = scalar_form, scalar_form.inputs, scalar_form.inputs[0]
        rule = IDENTITY_RULES.get(node.op)
        if rule and inputs and rule(node, source):
            counters[f"canonicalize.{node.op}"] += 1
            return source
        return None if scalar_form is None else builder.add(scalar_form)

    return rewrite(transform(graph, visit), GELU_RULES, "canonicalize")


def _scalar_form(builder, node, inputs):
    """op(x, c) / op(c, x) as a node op(x) {scalar=c[, reverse]} (not yet added), when c
    is a one-element constant of x's dtype and the result's type is the same; else None."""
    if node.op not in SCALAR_FORM_OPS or len(inputs) != 2:
        return None
    for at in (1, 0):
        constant, x = inputs[at], inputs[1 - at]
        if not isinstance(constant, Constant) or constant.type.numel() != 1 or constant.type.dtype != x.type.dtype:
            continue
        value = builder.constants[constant.name].item()
        attrs = {"scalar": value, **({"reverse": True} if at == 0 else {})}
        try:
            node_type = infer_type(node.op, [x.type], attrs)
        except IRTypeError:
            continue
        if node_type.same_as(node.type):
            return Node(node.op, (x,), attrs, node_type, node.source)
    return None


# ----------------------------------------------------------------------------- 4. GELU
def _near(value: float):
    return lambda scalar: isinstance(scalar, float) and math.isclose(scalar, value, rel_tol=1e-6)


def _times(pattern, value: float) -> list:
    """pattern · value, as a multiply by it or a division by its inverse."""
    return [Op("mul", pattern, scalar=_near(value)),
            Op("div", pattern, scalar=_near(1 / value), reverse=lambda r: not r)]


def _gelu_patterns(one_plus: list) -> list:
    """x · ½ · one_plus, the ½ anywhere, the products either way round."""
    patterns = []
    for term in one_plus:
        for half_x in _times(Any("x"), 0.5):
            patterns.append(Op("mul", half_x, term, commutative=True))
        for half_term in _times(term, 0.5):
            patterns.append(Op("mul", Any("x"), half_term, commutative=True))
        patterns += _times(Op("mul", Any("x"), term, commutative=True), 0.5)
    return patterns


_ERF_TERMS = [Op("add", Op("erf", scaled), scalar=1.0) for scaled in _times(Any("x"), 1 / math.sqrt(2))]
_CUBIC = [Op("add", Any("x"), c, commutative=True) for c in _times(Op("pow", Any("x"), scalar=3.0), 0.044715)]
_TANH_TERMS = [Op("add", Op("tanh", scaled), scalar=1.0)
               for cubic in _CUBIC for scaled in _times(cubic, math.sqrt(2 / math.pi))]


def _gelu(approximate: str):
    def build(builder, m):
        if not m.old("x").type.is_float:
            return None
        root = m.nodes[-1]
        return builder.op("gelu", m.x, approximate=approximate, source=root.source)

    return build


GELU_RULES = [
    *[Rule("gelu_erf", pattern, _gelu("none")) for pattern in _gelu_patterns(_ERF_TERMS)],
    *[Rule("gelu_tanh", pattern, _gelu("tanh")) for pattern in _gelu_patterns(_TANH_TERMS)],
]
