"""The work one kernel launch must do: its floating-point operations and the bytes it
must move to and from memory, from the group's IR and the tensors it was given.

This is the roofline's minimum, not a count of what the generated code does: each
input is read once and the output written once, except where an op reads a part of
its input. An embedding, qembedding or index_select reads the rows it gathers, not the
table; paged attention reads the K and V of each sequence's context, not the whole cache;
a cache write writes the new rows and reads nothing of the cache. FLOPs: 2·M·N·K per
gemm, 4·heads·dim per (query, key) pair attended (causal: a new token sees its prefix),
about 5 per element for norms and 1 for any other element computed; views are free.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ir.graph import Graph, Node
from ..ir.interpreter import bind_symbols
from ..ir.registry import is_view
from ..ir.types import evaluate_dim

NORM_FLOPS_PER_ELEMENT = 5  # square or subtract mean, sum, scale, multiply by the weight, add the bias


@dataclass(frozen=True)
class Cost:
    flops: float
    bytes: float


def launch_cost(group: Graph, args: tuple) -> Cost:
    """What running `group` on `args` (the tensors the kernel got) must cost."""
    sizes = bind_symbols(group.inputs, args)
    tensors = dict(zip(group.inputs, args))
    flops = sum(_flops(node, sizes, tensors) for node in group.nodes)
    moved = sum(_bytes_read(value, tensor, group, sizes, tensors) for value, tensor in tensors.items())
    return Cost(float(flops), float(moved + _bytes_written(group, sizes)))


def _numel(value, sizes: dict) -> int:
    total = 1
    for dim in value.type.shape:
        total *= evaluate_dim(dim, sizes)
    return total


def _itemsize(value) -> int:
    return torch.empty((), dtype=value.type.torch_dtype).element_size()


# ----------------------------------------------------------------------------- flops
def _flops(node: Node, sizes: dict, tensors: dict) -> int:
    if is_view(node.op) or node.op == "kv_cache_write":
        return 0
    rule = FLOP_RULES.get(node.op)
    if rule is not None:
        return rule(node, sizes, tensors)
    if node.op in ("rms_norm", "layer_norm"):
        return NORM_FLOPS_PER_ELEMENT * _numel(node.inputs[0], sizes)
    return _numel(node, sizes)


def _gemm_flops(node: Node, sizes: dict, tensors: dict) -> int:
    x, weight = node.inputs[:2]
    k = evaluate_dim(x.type.shape[-1], sizes)
    rows = _numel(x, sizes) // max(k, 1)
    n = node.attrs.get("n") or evaluate_dim(weight.type.shape[0], sizes)
    return 2 * rows * n * k + rows * n * len(node.attrs.get("epilogue", ()))


def _matmul_flops(node: Node, sizes: dict, tensors: dict) -> int:
    return 2 * _numel(node, sizes) * evaluate_dim(node.inputs[0].type.shape[-1], sizes)


def _attention_flops(node: Node, sizes: dict, tensors: dict) -> int:
    batch, heads, queries, dim = (evaluate_dim(d, sizes) for d in node.inputs[0].type.shape)
    keys = evaluate_dim(node.inputs[1].type.shape[-2], sizes)
    return 4 * batch * heads * queries * keys * dim


def _paged_attention_flops(node: Node, sizes: dict, tensors: dict) -> int:
    tokens, heads, dim = (evaluate_dim(d, sizes) for d in node.inputs[0].type.shape)
    return 4 * heads * dim * _pairs_attended(node, tokens, tensors)


def _pairs_attended(node: Node, tokens: int, tensors: dict) -> int:
    """(query, key) pairs: a sequence of q new tokens in a context of c sees, causally,
    c - q + j + 1 keys at its j-th new token. Without the index tensors (made inside
    the kernel), each token is taken to see all the tokens."""
    context_lens, cu_seqlens_q = (tensors.get(v) for v in node.inputs[3:5])
    if context_lens is None or cu_seqlens_q is None:
        return tokens * tokens
    queries = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()
    return sum(q * (c - q) + q * (q + 1) // 2 for q, c in zip(queries, context_lens.tolist()))


FLOP_RULES = {"gemm": _gemm_flops, "matmul": _matmul_flops, "attention": _attention_flops,
              "paged_attention": _paged_attention_flops}


# ----------------------------------------------------------------------------- bytes
def _bytes_read(value, tensor, group: Graph, sizes: dict, tensors: dict) -> int:
    """The whole input, unless every op reading it reads only a part of it."""
    parts = []
    for node in group.nodes:
        for position, operand in enumerate(node.inputs):
            if operand is value:
                rule = PARTIAL_READS.get((node.op, position))
                if rule is None:
                    return tensor.numel() * tensor.element_size()
                parts.append(rule(node, sizes, tensors))
    return sum(parts)


def _gathered_rows(node: Node, sizes: dict, tensors: dict) -> int:
    return _numel(node, sizes) * _itemsize(node)


def _gathered_part_rows(position: int):
    """qembedding's rule for its part at `position`: the rows of it that the ids select."""
    def rule(node: Node, sizes: dict, tensors: dict) -> int:
        part = node.inputs[position]
        return _numel(node.inputs[0], sizes) * _numel(part, sizes) // part.type.shape[0] * _itemsize(part)

    return rule


def _context_kv(node: Node, sizes: dict, tensors: dict) -> int:
    """K and V of the context of every sequence: cache [L, 2, blocks, block, heads, dim]."""
    cache, context_lens = node.inputs[1], tensors.get(node.inputs[3])
    _, _, blocks, block, heads, dim = (evaluate_dim(d, sizes) for d in cache.type.shape)
    tokens = int(context_lens.sum()) if context_lens is not None else blocks * block
    return 2 * tokens * heads * dim * _itemsize(cache)


PARTIAL_READS = {
    ("embedding", 0): _gathered_rows,
    ("index_select", 0): _gathered_rows,
    ("gather", 0): _gathered_rows,
    **{("qembedding", position): _gathered_part_rows(position) for position in (1, 2, 3)},
    ("paged_attention", 1): _context_kv,
    ("kv_cache_write", 0): lambda node, sizes, tensors: 0,
}


def _bytes_written(group: Graph, sizes: dict) -> int:
    root = group.outputs[0]
    if isinstance(root, Node) and root.op == "kv_cache_write":  # the new K and V rows, in place
        return sum(_numel(v, sizes) * _itemsize(v) for v in root.inputs[1:3])
    return _numel(root, sizes) * _itemsize(root)
