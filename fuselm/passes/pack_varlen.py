"""Run a padded encoder's token-wise work on its real tokens only (pack_varlen).

A padded batch `[B, S]` with a padding mask spends the work of every padded position in
every gemm, norm and activation, although attention masks those positions out and no
real position ever reads them. As effective_transformer, ByteTransformer and
TensorRT-LLM's remove_input_padding do, this pass packs the real tokens into `[T, ...]`
rows, runs the token-wise ops on them, runs attention over each sequence's rows
(`varlen_attention` with cu_seqlens) and unpacks only where a padded value is needed
(the outputs, an op that is not token-wise). Ops are in fuselm/ir/varlen_ops.py.

1. Find the padding mask, by value, not by knowing BERT: an `attention` whose q and k
   are `[B, H, S, D]` and whose mask input is computed from one graph input `m [B, S]`
   alone, such that for random masks m (left, right and scattered padding) the mask
   keeps exactly the keys where m != 0 (bool mask; or an additive mask: 0 kept, <= -1e4
   dropped) for every real query, alone or together with the causal triangle. No such
   attention: the graph is returned unchanged.
2. Add three graph inputs describing the packing (`<m>__tokens`, `<m>__positions`,
   `<m>__cu_seqlens`: `fuselm.runtime.varlen` computes them from m at every call), and
   walk the graph once. A value of shape `[B, S, ...]` is *packed* when it has a
   `[T, ...]` form; the graph inputs of that shape (other than m) are packed first.
   - pointwise ops with a packed operand run on `[T, ...]`; an operand that is constant
     over (B, S) drops those dims, one that varies (position embeddings) is packed too;
   - gemm, qgemm, layer_norm, rms_norm, softmax over a trailing dim, embedding's ids
     and reshapes keeping the leading (B, S) run on the packed rows; permutes are
     recorded, not run (a packed value may stand for a permuted `[B, H, S, D]`);
   - an attention of step 1 whose q, k, v are packed `[B, S, H, D]` seen as
     `[B, H, S, D]` becomes `varlen_attention`;
   - any other reader of a packed value, and every graph output, gets it unpacked
     (zeros at padding: the compiled model's padded positions are zeros, not what
     eager computes there; real positions are eager's).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import sympy
import torch

from ..ir.graph import Constant, Graph, GraphBuilder, Input, Node, Value, substitute_symbols
from ..ir.interpreter import interpret
from ..ir.registry import get_op
from ..ir.types import TensorType, dims_equal, symbol
from ..ir.varlen_ops import CU_SEQLENS, POSITIONS, TOKENS
from .base import counters

# op -> the input holding its rows (activations, ids): the op works on each row alone
ROW_OPS = {"gemm": 0, "qgemm": 0, "layer_norm": 0, "rms_norm": 0, "embedding": 1, "qembedding": 0}
DIM_OPS = {"softmax", "log_softmax"}  # over attr `dim`, packable when it is a trailing dim
MASK_SAMPLES = 3  # random masks each candidate must pass
SAMPLE_LENGTHS = (7, 37, 131)  # the lengths they have when S is symbolic
DROPPED = -1e4  # an additive mask at or below this drops the key


def pack_varlen(graph: Graph) -> Graph:
    graph = _same_symbols(graph)
    found = _padding_mask(graph)
    if found is None:
        return graph
    mask_input, attentions = found
    batch, length = mask_input.type.shape
    if isinstance(batch, int) and batch == length:
        return graph  # [B, S] and [S, S] values would look alike: packing one of the latter would be wrong
    try:
        return _Packer(graph, mask_input, attentions).run()
    except _Unsafe as reason:
        counters["pack_varlen.refused"] += 1
        counters[f"pack_varlen.refused.{reason}"] += 1
        return graph


class _Unsafe(Exception):
    """A reader whose result at real positions would see the zeros packing leaves at padded
    positions where eager has values: the graph stays padded."""


# ----------------------------------------------------------------------------- 1. the mask
def _padding_mask(graph: Graph):
    """(the mask input, {attention node: causal}) of the attentions step 1 accepts."""
    inputs = [v for v in graph.inputs if v.type.rank == 2]
    checked: dict = {}  # mask value -> (input, causal) or None
    accepted, mask_input = {}, None
    for node in graph.nodes:
        if node.op != "attention" or len(node.inputs) != 4 or node.attrs.get("causal"):
            continue
        q, k = node.inputs[:2]
        if not dims_equal(q.type.shape[2], k.type.shape[2]):
            continue  # cross-attention
        batch, length = q.type.shape[0], q.type.shape[2]
        mask = node.inputs[3]
        if mask not in checked:
            candidates = [v for v in inputs if dims_equal(v.type.shape[0], batch) and dims_equal(v.type.shape[1], length)]
            checked[mask] = _mask_semantics(graph, mask, candidates)
        result = checked[mask]
        if result is None or (mask_input is not None and result[0] is not mask_input):
            continue
        mask_input = result[0]
        accepted[node] = result[1]
    return (mask_input, accepted) if accepted else None


def _same_symbols(graph: Graph) -> Graph:
    """The graph with the sizes of a mask input named as the attention's (B, S): torch
    names the batch dims of `input_ids` and `attention_mask` apart when nothing in the
    model relates them (automatic dynamic shapes), though a call with two different
    sizes fails in eager; unified, a call must give them equal (the runtime checks)."""
    for node in graph.nodes:
        if node.op != "attention" or len(node.inputs) != 4:
            continue
        q = node.inputs[0]
        read = {v for n in _ancestors(graph, node.inputs[3]) for v in n.inputs if isinstance(v, Input)}
        if len(read) != 1 or next(iter(read)).type.rank != 2:
            continue
        mask = next(iter(read))
        k = node.inputs[1]  # the mask's dims are the batch and the keys
        mapping = {dim: size for dim, size in zip(mask.type.shape, (q.type.shape[0], k.type.shape[2]))
                   if isinstance(dim, sympy.Symbol) and isinstance(size, sympy.Symbol) and dim != size}
        if mapping:
            counters["pack_varlen.same_symbols"] += 1
            return substitute_symbols(graph, mapping)
    return graph


def _mask_semantics(graph: Graph, mask: Value, candidates: list):
    """(m, causal) when `mask` is m's key padding mask (and the causal triangle)."""
    nodes = _ancestors(graph, mask)
    read = {v for n in nodes for v in n.inputs if isinstance(v, Input)} | ({mask} if isinstance(mask, Input) else set())
    if len(read) != 1 or next(iter(read)) not in candidates:
        return None
    source = next(iter(read))
    sub = Graph([source], nodes, [mask], {n: t for n, t in graph.constants.items()
                                         if any(isinstance(v, Constant) and v.name == n for x in nodes for v in x.inputs)})
    batch = source.type.shape[0] if isinstance(source.type.shape[0], int) else 3
    static = isinstance(source.type.shape[1], int)
    generator = torch.Generator().manual_seed(0)
    verdicts = set()
    for sample in range(MASK_SAMPLES):
        # a symbolic S is tried at several lengths: a window or band wider than one of them
        # shows at the next (a 7-token sample cannot tell a sliding window of 8 from padding)
        length = source.type.shape[1] if static else SAMPLE_LENGTHS[sample % len(SAMPLE_LENGTHS)]
        keep = torch.rand(batch, length, generator=generator) < 0.7
        keep[0] = True  # a full row, a right-padded one, a left-padded one
        if batch > 1:
            keep[1] = torch.arange(length) < max(1, length // 2)
        if batch > 2:
            keep[2] = torch.arange(length) >= length // 3
        try:
            value = interpret(sub, keep.to(source.type.torch_dtype))
        except Exception:  # a mask no sample can run (shapes the samples do not meet)
            return None
        verdicts.add(_verdict(value, keep))
    return (source, verdicts.pop()) if len(verdicts) == 1 and None not in verdicts else None


def _verdict(value: torch.Tensor, keep: torch.Tensor) -> Optional[bool]:
    """False: key padding; True: key padding and causal; None: neither."""
    if value.dim() > 4:
        return None
    batch, length = keep.shape
    value = value.reshape((1,) * (4 - value.dim()) + tuple(value.shape))
    try:
        shape = torch.broadcast_shapes(value.shape, (batch, 1, length, length))
    except RuntimeError:
        return None
    if shape[0] != batch or shape[2] != length or shape[3] != length:
        return None
    if value.dtype == torch.bool:
        kept, dropped = value, ~value
    elif value.is_floating_point():
        kept, dropped = value == 0, value <= DROPPED
    else:
        return None
    real_queries = keep[:, None, :, None]
    padding = keep[:, None, None, :].expand(shape)
    for causal in (False, True):
        expected = padding & torch.ones(length, length, dtype=torch.bool).tril() if causal else padding
        if bool(torch.where(real_queries, kept.expand(shape) == expected, True).all()) and \
                bool(torch.where(real_queries & ~expected, dropped.expand(shape), True).all()):
            return causal
    return None


def _ancestors(graph: Graph, value: Value) -> list:
    """The nodes `value` is computed from, in graph order."""
    wanted, stack = set(), [value]
    while stack:
        v = stack.pop()
        if isinstance(v, Node) and v not in wanted:
            wanted.add(v)
            stack.extend(v.inputs)
    return [n for n in graph.nodes if n in wanted]


# ----------------------------------------------------------------------------- 2. the walk
@dataclass
class _Packed:
    """A value v of the padded graph as `permute(unpack(rows), perm)`: rows `[T, *R]`
    of the new graph; perm of length 2 + len(R), identity for a plain `[B, S, *R]`."""
    rows: Value
    perm: tuple

    @property
    def plain(self) -> bool:
        return self.perm == tuple(range(len(self.perm)))


class _Packer:
    def __init__(self, graph: Graph, mask_input: Input, attentions: dict):
        self.graph, self.mask, self.attentions = graph, mask_input, attentions
        self.batch, self.length = mask_input.type.shape
        self.builder = GraphBuilder(graph.constants)
        self.builder.inputs = list(graph.inputs)
        tokens = symbol(_fresh_symbol(graph, "T_packed"))
        name = mask_input.name
        self.tokens = self.builder.input(f"{name}__{TOKENS}", TensorType((tokens,), "i64"))
        self.positions = self.builder.input(f"{name}__{POSITIONS}", TensorType((self.batch, self.length), "i64"))
        self.cu_seqlens = self.builder.input(f"{name}__{CU_SEQLENS}", TensorType((self.batch + 1,), "i32"))
        self.env: dict = {}  # padded value -> its value in the new graph (padded form)
        self.packed: dict = {}  # padded value -> _Packed
        self.unpacked: set = set()  # packed values whose padded form is an unpack (zeros at padding)

    def run(self) -> Graph:
        for value in self.graph.inputs:  # token, type and position ids (a float input may be another
            if value is not self.mask and self._leading(value.type) and not value.type.is_float:  # sequence)
                self.packed[value] = _Packed(self._pack(value), tuple(range(value.type.rank)))
        for node in self.graph.nodes:
            if any(v in self.packed for v in node.inputs) and self._rewrite(node):
                continue
            inputs = tuple(self._padded(v) for v in node.inputs)
            self._check_reader(node)
            self.env[node] = self.builder.add(Node(node.op, inputs, node.attrs, node.type, node.source))
        outputs = [self._padded(v) for v in self.graph.outputs]
        return self.builder.build(outputs).without_unused_constants()

    # -- forms of a value
    def _leading(self, t: TensorType) -> bool:
        return t.rank >= 2 and dims_equal(t.shape[0], self.batch) and dims_equal(t.shape[1], self.length)

    def _new(self, value: Value) -> Value:
        if isinstance(value, Constant):
            return self.builder.adopt(value)
        return self.env.get(value, value)

    def _pack(self, padded: Value, source: Optional[str] = None) -> Value:
        counters["pack_varlen.pack"] += 1
        return self.builder.op("pack", padded, self.tokens, source=source)

    def _check_reader(self, node: Node) -> None:
        """_Unsafe for a node that mixes positions along S reading a packed value: only
        reductions (pooling; with a masked value it sees zeros where eager does) and the
        queries of an attention (a real query's row reads its keys, not other queries)
        may; keys and values, matmuls, scans, concatenations and fallbacks may not."""
        packed = [i for i, v in enumerate(node.inputs) if v in self.unpacked]
        if not packed or node.op in ("sum", "mean", "amax", "amin"):
            return
        if node.op == "attention" and packed == [0]:
            return
        if get_op(node.op).pointwise or get_op(node.op).view:
            return  # same positions in, same positions out (a view keeping (B, S) is packed already)
        rank = node.inputs[packed[0]].type.rank
        if node.op == "embedding" or (node.op in ROW_OPS and rank >= 3):
            return  # each row (id) on its own
        if node.op in DIM_OPS and node.attrs["dim"] % rank >= 2:
            return
        raise _Unsafe(node.op)

    def _padded(self, value: Value) -> Value:
        """The padded form of a value (unpacked, and permuted, where it is packed); a graph
        input is its own padded form (its values at padding are the caller's)."""
        if isinstance(value, Input):
            return value
        if value not in self.packed:
            return self._new(value)
        if value not in self.env and self._recomputable(value):  # e.g. ids != pad: eager's values at padding
            inputs = tuple(self._padded(v) for v in value.inputs)
            self.env[value] = self.builder.add(Node(value.op, inputs, value.attrs, value.type, value.source))
        if value not in self.env:
            self.unpacked.add(value)
            form = self.packed[value]
            counters["pack_varlen.unpack"] += 1
            padded = self.builder.op("unpack", form.rows, self.positions)
            if not form.plain:
                padded = self.builder.op("permute", padded, dims=form.perm)
            self.env[value] = padded
        return self.env[value]

    def _recomputable(self, value: Value) -> bool:
        """Whether a value's padded form can be computed again from the graph inputs by
        pointwise ops and views alone (cheap, and exactly eager's at padded positions)."""
        if not isinstance(value, Node):
            return True
        if value not in self.packed:
            return True
        definition = get_op(value.op)
        return (definition.pointwise or definition.view) and all(self._recomputable(v) for v in value.inputs)

    def _rows(self, value: Value, rank: int, source: Optional[str]) -> Value:
        """`value` as an operand of a packed op of output rank `rank`: its rows if packed,
        without its (B, S) dims if constant over them, else packed from its padded form."""
        form = self.packed.get(value)
        if form is not None:
            return form.rows
        shape = (1,) * (rank - value.type.rank) + tuple(value.type.shape)
        new = self._new(value)
        if len(shape) < 2 or (dims_equal(shape[0], 1) and dims_equal(shape[1], 1)):
            if value.type.rank <= rank - 2:
                return new
            return self.builder.op("reshape", new, shape=shape[2:])
        full = (self.batch, self.length) + shape[2:]
        if len(shape) != value.type.rank:
            new = self.builder.op("reshape", new, shape=shape)
        if not all(dims_equal(a, b) for a, b in zip(shape, full)):
            new = self.builder.op("expand", new, shape=full)
        return self._pack(new, source)

    # -- rewrites; True when the node got a packed form
    def _rewrite(self, node: Node) -> bool:
        definition = get_op(node.op)
        if node.op == "permute":
            form = self.packed[node.inputs[0]]
            self.packed[node] = _Packed(form.rows, tuple(form.perm[d] for d in node.attrs["dims"]))
            return True
        if node in self.attentions:
            return self._attention(node)
        rank = node.type.rank
        packed = [self.packed[v] for v in node.inputs if v in self.packed]
        if not self._leading(node.type) or not all(f.plain for f in packed):
            return False
        if definition.pointwise:
            if any(f.rows.type.rank != rank - 1 for f in packed):
                return False  # a packed operand of lower rank: its (B, S) broadcast over other dims
            rows = [self._rows(v, rank, node.source) for v in node.inputs]
        elif node.op in ROW_OPS and rank >= 3 and self._packed_only_at(node, ROW_OPS[node.op]):
            rows = [self.packed[v].rows if v in self.packed else self._new(v) for v in node.inputs]
        elif node.op in DIM_OPS and node.attrs["dim"] % rank >= 2:
            return self._packed_node(node, [packed[0].rows], dim=node.attrs["dim"] % rank - 1)
        elif node.op == "slice" and node.attrs["dim"] % rank >= 2:
            return self._packed_node(node, [packed[0].rows], dim=node.attrs["dim"] % rank - 1)
        elif node.op == "reshape":
            rows = packed[0].rows
            return self._packed_node(node, [rows], shape=(rows.type.shape[0],) + tuple(node.type.shape[2:]))
        else:
            return False
        return self._packed_node(node, rows)

    def _packed_only_at(self, node: Node, index: int) -> bool:
        return all(v not in self.packed for i, v in enumerate(node.inputs) if i != index)

    def _packed_node(self, node: Node, rows: list, **changed) -> bool:
        value = self.builder.op(node.op, *rows, source=node.source, **{**node.attrs, **changed})
        counters[f"pack_varlen.{node.op}"] += 1
        self.packed[node] = _Packed(value, tuple(range(node.type.rank)))
        return True

    def _attention(self, node: Node) -> bool:
        q, k, v = (self.packed.get(x) for x in node.inputs[:3])
        heads_first = (0, 2, 1, 3)
        if any(form is None or form.perm != heads_first or form.rows.type.rank != 3 for form in (q, k, v)):
            return False
        attrs = {"scale": node.attrs.get("scale"), "causal": self.attentions[node]}
        value = self.builder.op("varlen_attention", q.rows, k.rows, v.rows, self.cu_seqlens, source=node.source, **attrs)
        counters["pack_varlen.varlen_attention"] += 1
        self.packed[node] = _Packed(value, heads_first)
        return True


def _fresh_symbol(graph: Graph, stem: str) -> str:
    taken = {str(s) for v in [*graph.inputs, *graph.nodes] for s in v.type.symbols}
    name = stem
    while name in taken:
        name += "_"
    return name
