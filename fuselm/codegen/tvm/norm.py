"""rms_norm / layer_norm over the last dimension, optionally with the residual add.

x [R..., D] is flattened to [R, D]. One parallel iteration per row: the row's sums
are vector partial sums (one accumulator per lane, reduced at the end), then the
normalized row is written with vector stores. Layer norm takes two passes over the
row (mean, then the variance of x - mean, as torch does) while it is in L1.

With `residual=true` the kernel writes both halves of the stacked output: out[1] =
x + residual (the new residual stream), written first, and out[0] = norm(out[1]),
whose passes read the row back from L1.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tvm import s_tir, te, tirx

from ...errors import UnsupportedKernelError
from ...ir.graph import Graph
from ..memory import KERNEL_ALIGNMENT, kernel_ready
from .build import SERIAL_MAX, const, operand_positions, single_node, tir_dtype, vector_lanes

OPS = ("rms_norm", "layer_norm")


@dataclass(frozen=True)
class NormSpec:
    op: str
    D: int
    params: int  # weight (and bias) inputs
    residual: bool
    eps: float
    dtype: str

    @property
    def name(self) -> str:
        return f"{self.op}_d{self.D}" + ("_residual" if self.residual else "")


def spec_of(node) -> NormSpec:
    x = node.inputs[0].type
    if not isinstance(x.shape[-1], int):
        raise UnsupportedKernelError(f"{node.op} needs a static last dimension, got {x}")
    if x.dtype != "f32":
        raise UnsupportedKernelError(f"the cpu {node.op} kernel is fp32, got {x.dtype}")
    residual = bool(node.attrs.get("residual", False))
    eps = node.attrs.get("eps")
    if eps is None:  # torch's defaults: 1e-5 for layer_norm, the dtype's epsilon for rms_norm
        eps = 1e-5 if node.op == "layer_norm" else torch.finfo(torch.float32).eps
    return NormSpec(node.op, x.shape[-1], len(node.inputs) - 1 - residual, residual, float(eps), x.dtype)


def _row_sum(R, src, spec: NormSpec, lanes: int, name: str, value=lambda v, r: v):
    """Sum over each row of value(src(r, d)): per-lane partial sums, then across lanes."""
    chunk = te.reduce_axis((0, spec.D // lanes), name=f"{name}_chunk")
    partial = te.compute((R, lanes),
                         lambda r, lane: te.sum(value(src(r, chunk * lanes + lane), r), axis=chunk), name=f"{name}_lanes")
    lane = te.reduce_axis((0, lanes), name=f"{name}_lane")
    return te.compute((R,), lambda r: te.sum(partial[r, lane], axis=lane), name=name)


def norm_func(spec: NormSpec, parallel: bool = True) -> tirx.PrimFunc:
    R, D, dtype = tirx.Var("R", "int32"), spec.D, tir_dtype(spec.dtype)
    lanes = vector_lanes() if spec.D % vector_lanes() == 0 else 1
    x = te.placeholder((R, D), dtype, name="x")
    params = [te.placeholder((D,), dtype, name=n) for n in ("weight", "bias")[: spec.params]]
    inputs = [x, *params]
    src, outputs = x.__call__, []
    if spec.residual:  # the row sum is written first (out[1]); the passes read it back from L1
        residual = te.placeholder((R, D), dtype, name="residual")
        inputs.append(residual)
        total_out = te.compute((R, D), lambda r, d: x[r, d] + residual[r, d], name="total_out")
        src, outputs = total_out.__call__, [total_out]
    eps = tirx.const(spec.eps, dtype)
    if spec.op == "rms_norm":
        squares = _row_sum(R, src, spec, lanes, "sum_squares", lambda v, r: v * v)

        def normed(r, d):
            return src(r, d) * tirx.rsqrt(squares[r] / const(D, eps) + eps)
    else:
        total = _row_sum(R, src, spec, lanes, "sum")
        mean = te.compute((R,), lambda r: total[r] / const(D, eps), name="mean")
        centered = _row_sum(R, src, spec, lanes, "sum_centered", lambda v, r: (v - mean[r]) * (v - mean[r]))

        def normed(r, d):
            return (src(r, d) - mean[r]) * tirx.rsqrt(centered[r] / const(D, eps) + eps)

    def affine(r, d):
        y = normed(r, d)
        y = y * params[0][d] if spec.params >= 1 else y
        return y + params[1][d] if spec.params >= 2 else y

    out = te.compute((R, D), affine, name="out")
    return _schedule(te.create_prim_func([*inputs, out, *outputs]), lanes, parallel)


# the row's blocks, producers first
_ROW_BLOCKS = ["sum_squares_lanes", "sum_squares", "sum_lanes", "sum", "mean", "sum_centered_lanes", "sum_centered"]


def _schedule(func, lanes: int, parallel: bool) -> tirx.PrimFunc:
    """One parallel loop over rows; each row's sums, then its output, inside it.

    Without a residual, the sums are computed at the output's row loop (consumers
    first). With one, the row sum (an output block, which cannot move) anchors the row
    loop and the sums and the output follow it there (producers first).
    """
    sch = s_tir.Schedule(func)
    present = {sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))}
    names = [name for name in _ROW_BLOCKS if name in present]
    anchor = sch.get_sblock("total_out" if "total_out" in present else "out")
    row, col = sch.get_loops(anchor)
    if "total_out" in present:
        for name in names + ["out"]:
            sch.reverse_compute_at(sch.get_sblock(name), row, preserve_unit_loops=True)
        if lanes > 1:
            sch.vectorize(sch.split(sch.get_loops(sch.get_sblock("out"))[-1], [None, lanes])[1])
    else:
        for name in reversed(names):
            sch.compute_at(sch.get_sblock(name), row, preserve_unit_loops=True)
    vector_sums = []  # (block, chunk loop): decomposed last, as parallel() wants reduction blocks whole
    for name in names:
        if name.endswith("_lanes") and lanes > 1:
            block = sch.get_sblock(name)
            lane, chunk = sch.get_loops(block)[-2:]
            sch.reorder(chunk, lane)
            sch.vectorize(lane)
            vector_sums.append((block, chunk))
    if lanes > 1:
        sch.vectorize(sch.split(col, [None, lanes])[1])
    if parallel:
        sch.parallel(row)
    for block, chunk in vector_sums:
        sch.decompose_reduction(block, chunk)
    return sch.mod["main"]


def generate(group: Graph) -> tuple:
    """(kernel name, {function name: scheduled PrimFunc})."""
    spec = spec_of(single_node(group))
    return spec.name, {"main": norm_func(spec), "serial": norm_func(spec, parallel=False)}


def make_run(group: Graph, functions):
    """run(*group inputs): rows flattened, the output (stacked when residual) allocated.

    2-D contiguous inputs go straight to TVM (which checks shapes and strides); others
    are flattened and made contiguous first.
    """
    node = single_node(group)
    spec, positions = spec_of(node), operand_positions(group, node)
    parallel, serial = functions["main"], functions["serial"]
    D = spec.D

    def call(args, out, rows):
        if rows:
            kernel = serial if rows * D < SERIAL_MAX else parallel
            kernel(*args, *((out[0], out[1]) if spec.residual else (out,)))

    def run(*inputs):
        args = [inputs[i] for i in positions]
        x = args[0]
        out = torch.empty(((2,) if spec.residual else ()) + tuple(x.shape), dtype=x.dtype)
        if x.dim() == 2 and all(a.data_ptr() % KERNEL_ALIGNMENT == 0 for a in args):
            try:
                call(args, out, x.shape[0])
                return out
            except ValueError:  # strided inputs: take the general path
                pass
        flat = [kernel_ready(a.reshape(-1, D) if a.dim() > 1 else a) for a in args]
        rows = flat[0].shape[0]
        call(flat, out.view(*out.shape[: out.dim() - x.dim()], rows, D), rows)
        return out

    return run


def program_call(group: Graph, forms: dict, operands: list, ctx):
    """`make_run` in the cpu program (program.py): rows flattened; a residual norm's two
    outputs (normed, sum) are the parts of its stacked result."""
    from .program import Stacked

    node = single_node(group)
    spec, positions = spec_of(node), operand_positions(group, node)
    shape = ctx.shape(node.inputs[0].type)
    rows, D, dtype = ctx.product(shape[:-1]), spec.D, tir_dtype(spec.dtype)
    args = [ctx.reshape(operands[at], [rows, D]) if group.inputs[at].type.rank > 1 else operands[at]
            for at in positions]
    outs = [([rows, D], dtype)] * (2 if spec.residual else 1)

    def form(name):
        return lambda: ctx.call_multi(forms[name], args, outs)

    result = ctx.choose([(rows * D < SERIAL_MAX, form("serial"))], form("main"))
    if spec.residual:
        return Stacked(tuple(ctx.reshape(ctx.item(result, i), shape) for i in range(2)))
    return ctx.reshape(result, shape)
