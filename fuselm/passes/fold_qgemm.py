"""Fold each quantize/dequantize pair around a gemm into one `qgemm`.

    gemm(x, dequantize(@q, @scale[, @offset]))                       -> qgemm(x, @q, @scale[, @offset])
    gemm(quantize_dynamic(x * @smooth), dequantize(@q, @scale))        -> qgemm(x, @smooth, @q, @scale) {activations="int8"}
    gemm(quantize_dynamic(x, @keep), dequantize(@q, @scale, @keep, @w_keep) {outliers})
                                                                       -> qgemm(x, @q, @scale, @keep, @w_keep) {activations="int8"}

The epilogue and its inputs carry over; qgemm's reference computes exactly what the
pair did, and its kernels dequantize in registers (never the whole weight). A gemm whose
dequantize reads anything but constants, or whose activation quantization keeps other
features than its weight, stays as it is.
"""
from __future__ import annotations

from ..ir.graph import Constant, Graph, Node, transform
from .base import counters
from .weights import dequantized_weight


def _part_names(dequantize: Node) -> list:
    names = ["q", "scale"] + (["offset"] if dequantize.attrs["format"] == "int4" else [])
    return names + (["keep", "w_keep"] if dequantize.attrs.get("outliers") else [])


def fold_qgemm(graph: Graph) -> Graph:
    def visit(builder, node, inputs):
        # `inputs` are values of the new graph, and so is everything upstream of them.
        if node.op != "gemm":
            return None
        dequantize, _ = dequantized_weight(inputs[1])
        if dequantize is None:
            return None
        parts = dict(zip(_part_names(dequantize), dequantize.inputs))
        x, activations = inputs[0], "float"
        if isinstance(x, Node) and x.op == "quantize_dynamic":
            keep = x.inputs[1] if len(x.inputs) > 1 else None
            if keep is not parts.get("keep"):
                return None
            x, activations = x.inputs[0], "int8"
            if isinstance(x, Node) and x.op == "mul" and isinstance(x.inputs[1], Constant) and x.inputs[1].type.rank == 1:
                parts = {"smooth": x.inputs[1], **parts}
                x = x.inputs[0]
        elif "keep" in parts:
            return None  # outlier columns belong with int8 activations
        attrs = {key: dequantize.attrs[key] for key in ("format", "group_size", "n", "k")}
        counters["fold_qgemm"] += 1
        return builder.op("qgemm", x, *parts.values(), *inputs[2:], parts=list(parts), activations=activations,
                          epilogue=node.attrs.get("epilogue", ()), source=node.source, **attrs)

    return transform(graph, visit)
