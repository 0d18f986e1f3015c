"""Prepack gemm weights, once, into the layout the target's kernels read (cpu: k16 panels).

A gemm's weight is torch's [N, K]; the cpu kernels read it as "k16" panels
[ceil(N/16), K, 16] (see `weight_layout` at gemm in ir/core_ops.py), so no kernel
packs anything per call and the decode (GEMV) and prefill (GEMM) forms share one tensor.

The rule visits each gemm whose weight is an [N, K] fp32 constant. It fires only when
every reader of that constant is a gemm reading it as its weight, all with the same
half pairing (all gated_silu or none): the constant is then packed once, with torch at
compile time, into `<name>.k16`, and every such gemm reads the packed tensor with
{weight_layout="k16", n=N}. The [N, K] constant goes with its last reader. A constant
read by anything else (a tied embedding table that is also the lm_head) or a graph output
stays as it is, and so do its gemms: weights live once, never in two layouts.
"""
from __future__ import annotations

from ..ir.core_ops import pack_weight, weight_halves
from ..ir.graph import Constant, Graph, transform
from .base import counters

LAYOUT = "k16"


def _halves(gemm) -> int:
    return weight_halves(gemm.attrs.get("epilogue", ()))


def _packable(w, readers: list, outputs: set) -> bool:
    """Every reader a gemm taking `w` as its weight only, all with one half pairing."""
    if w in outputs or not readers or w.type.dtype != "f32" or w.type.rank != 2 or w.type.symbols:
        return False
    for gemm in readers:
        only_weight = gemm.op == "gemm" and gemm.inputs[1] is w and w not in gemm.inputs[:1] + gemm.inputs[2:]
        if not only_weight or gemm.inputs[0].type.dtype != "f32" or "weight_layout" in gemm.attrs:
            return False
    return len({_halves(g) for g in readers}) == 1


def prepack_weights(graph: Graph, donate_weights: bool = False) -> Graph:
    """`donate_weights`: write each packed weight into its [N, K] original's own storage
    (same element count when N is a multiple of 16), so no second copy of the weights
    exists even for a moment; the module the graph came from must not run afterwards."""
    readers, outputs = graph.users(), set(graph.outputs)
    sharers = _storage_sharers(graph) if donate_weights else {}
    packed: dict = {}  # [N, K] constant -> its k16 constant

    def visit(builder, node, inputs):
        w = node.inputs[1] if node.op == "gemm" else None
        if not isinstance(w, Constant) or not _packable(w, readers.get(w, []), outputs):
            return None
        if w not in packed:
            original = builder.constants[w.name]
            tensor = pack_weight(original, _halves(node))
            if sharers.get(original.untyped_storage().data_ptr()) == 1:
                tensor = _moved_into(original, tensor)
            packed[w] = builder.constant(builder.fresh_constant_name(f"{w.name}.{LAYOUT}"), tensor)
            counters["layout.weights"] += 1
        counters["layout.k16"] += 1
        attrs = dict(node.attrs, weight_layout=LAYOUT, n=w.type.shape[0])
        return builder.op("gemm", inputs[0], packed[w], *inputs[2:], source=node.source, **attrs)

    return transform(graph, visit)


def _storage_sharers(graph: Graph) -> dict:
    """How many constants of the graph use each storage (a tie or a view makes it > 1)."""
    counts: dict = {}
    for tensor in graph.constants.values():
        key = tensor.untyped_storage().data_ptr()
        counts[key] = counts.get(key, 0) + 1
    return counts


def _moved_into(original, packed):
    """`packed`, stored in `original`'s memory when that memory is exactly its own."""
    whole = original.untyped_storage().nbytes() == packed.numel() * packed.element_size()
    if not (whole and original.is_contiguous() and original.storage_offset() == 0 and original.dtype == packed.dtype):
        return packed
    original.view(-1).copy_(packed.view(-1))
    return original.view(packed.shape)
