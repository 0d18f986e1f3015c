"""Give every read of a packed weight's stand-in (quant/packed.py) the weight's parts.

    gemm(x, @w)           -> gemm(x, dequantize(@w.q, @w.scale[, @w.offset]))
    embedding(@w, ids)    -> qembedding(ids, @w.q, @w.scale[, @w.offset])

This is how quantize="gguf" serves a GGUF file's own Q4_0 / Q4_1 / Q8_0 tensors. It runs
right after matmul_to_gemm, while each gemm reads its weight as captured; constant
folding leaves `dequantize` alone (a transient op), fusion concatenates dequantized
siblings part by part (passes/weights.py), and fold_qgemm turns each gemm of a
dequantized weight into a `qgemm`, so no float copy of a packed weight is ever made. A
tied weight (one stand-in read by the embedding and the output gemm) gets one set of
parts that both read. A stand-in read by any other op is an error naming it: its values
exist only as parts.
"""
from __future__ import annotations

from ..errors import FuselmError
from ..ir.graph import Constant, Graph, transform
from ..quant.packed import PackedWeights
from .base import counters


def use_packed_weights(graph: Graph, packed: PackedWeights) -> Graph:
    constants_of: dict = {}  # id(PackedWeight) -> its parts as constants of the new graph

    def parts(builder, value):
        """(PackedWeight, its part constants) if `value` is a stand-in, else (None, None)."""
        weight = packed.of(builder.constants[value.name]) if isinstance(value, Constant) else None
        if weight is None:
            return None, None
        if id(weight) not in constants_of:
            constants_of[id(weight)] = [builder.constant(builder.fresh_constant_name(f"{value.name}.{part}"), t)
                                        for part, t in weight.parts.items()]
        return weight, constants_of[id(weight)]

    def visit(builder, node, inputs):
        weight_index = {"gemm": 1, "embedding": 0}.get(node.op)
        for index, value in enumerate(inputs):
            weight, constants = parts(builder, value)
            if weight is None:
                continue
            if index != weight_index:
                reader = node.attrs["overload"] if node.op == "aten" else node.op
                raise FuselmError(f"the packed (GGUF-quantized) weight {value.name} is read by {reader}"
                                  f"{f' at {node.source}' if node.source else ''}, which has no quantized form; "
                                  "load the model without quantize='gguf'")
            n, k = weight.shape
            attrs = {"format": weight.format, "group_size": weight.group_size, "n": n, "k": k}
            counters[f"packed_weights.{node.op}"] += 1
            if node.op == "embedding":
                rows = builder.op("qembedding", inputs[1], *constants, source=node.source, **attrs)
                return _cast(builder, rows, node.type.dtype, node.source)
            w = builder.op("dequantize", *constants, outliers=False, source=node.source, **attrs)
            w = _cast(builder, w, value.type.dtype, node.source)
            return builder.op("gemm", inputs[0], w, *inputs[2:], source=node.source, **node.attrs)
        return None

    return transform(graph, visit)


def _cast(builder, value, dtype: str, source):
    return value if value.type.dtype == dtype else builder.op("cast", value, dtype=dtype, source=source)
