"""gemm(x, w, *extras) {epilogue}: y = x @ w.T, then the epilogue, on fp32.

x [M..., K] is flattened to [M, K]. w comes in one of two layouts (the gemm's
`weight_layout`, see ir/core_ops.py), and each has one module of three PrimFuncs built
for a symbolic M; `run` picks one per call: `gemv1` (M = 1), `gemv` (M <= GEMV_MAX_ROWS,
decode) or `gemm` (prefill).

k16 panels [ceil(N/16), K, 16], what the cpu `layout` pass gives every gemm whose weight
it owns: each panel holds 16 columns of w for every k, contiguous, so all three forms
are one outer-product micro-kernel straight from the panels, with no packing at run
time. A register tile is `mr` rows of x times `panels` whole panels: per k, x broadcast
and 16 floats of each panel (two AVX2 vectors), one vector accumulator per row and
vector, so decode streams each panel front to back (counts below are for AVX2):
- `gemv1`: 1 row x 4 panels, 8 accumulators: enough independent FMA chains to run at
  the speed memory delivers w;
- `gemv`: 2 rows x 2 panels, 8 accumulators; the next rows re-read the panels from L1/L2;
- `gemm`: the BLIS micro-kernel, 6 rows x 1 panel, 12 accumulators; each parallel
  block owns 3 panels (48 columns, in L2) and runs every row of x against them.
The same tensor serves all three: weights live once, in this layout.

[N, K], torch's layout, for weights the pass leaves alone (a tied embedding / lm_head):
- `gemv1` and `gemv`: a dot-product form that streams w's rows once. A tile of 1 row of
  x x 8 rows of w (gemv1), or 2 x 4 (gemv: half the reloads of w per row of x, and 4
  rows of K=1536 still fit L1), keeps 8 vector accumulators along K in registers, then
  sums each one's lanes.
- `gemm`: the k16 `gemm` form, with the panels packed per call: each parallel block
  packs its 3 panels from w's rows into a buffer that stays in L2, then runs every row
  of x against them.

Rows are padded to a multiple of the tile's rows by clamping x's row index (and columns
to whole tiles by clamping the panel index), so inner loops have no guards; only the
stores are predicated. The epilogue is one expression applied to the register tile
before its store. A gated SiLU splits w's rows into halves [gate | up]: a tile holds both
halves of its output columns (a k16 panel pairs 8 gate with 8 up columns), so
silu(gate) * up needs no second pass.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from tvm import s_tir, te, tirx

from ...errors import UnsupportedKernelError
from ...ir.core_ops import PANEL, packed_weight_shape
from ...ir.graph import Graph
from . import fastmath
from ..memory import KERNEL_ALIGNMENT, kernel_ready
from .build import const, operand_positions, single_node, tir_dtype, vector_lanes

OPS = ("gemm",)
GEMV_MAX_ROWS = 16  # the row count up to which the `gemv` form beats `gemm`
GEMV_FORMS = ((1, "gemv1"), (GEMV_MAX_ROWS, "gemv"))  # (most rows, form) in order; more rows: "gemm"
_WITH_INPUT = ("bias", "residual")
# The k16 forms' register tiles: (rows of x, panels, tiles per parallel block)
PANEL_TILES = {"gemv1": (1, 4, 1), "gemv": (2, 2, 1), "gemm": (6, 1, 3)}


ACTIVATIONS = {  # vectorizable forms: LLVM turns exp/erf/tanh on vectors into libm calls per lane
    "relu": lambda v: tirx.max(v, const(0.0, v)),
    "gelu": fastmath.gelu,
    "gelu_tanh": fastmath.gelu_tanh,
    "silu": fastmath.silu,
}


@dataclass(frozen=True)
class GemmSpec:
    """What a gemm node computes, with sizes: K, w's rows N, and the epilogue."""

    K: int
    N: int
    steps: tuple
    extra_ranks: tuple  # rank of each extra input (bias 1, residual 1 or 2 once flattened)
    dtype: str
    layout: Optional[str] = None  # w's weight_layout: None for [N, K], "k16" for panels

    @property
    def halves(self) -> int:
        return 2 if "gated_silu" in self.steps else 1

    @property
    def n_out(self) -> int:
        return self.N // self.halves

    @property
    def name(self) -> str:
        layout = [f"w{self.layout}"] if self.layout else []
        return "_".join(["gemm", f"k{self.K}", f"n{self.n_out}", *self.steps, *layout])


def spec_of(node) -> GemmSpec:
    x, w = node.inputs[0].type, node.inputs[1].type
    steps = tuple(node.attrs.get("epilogue", ()))
    if x.dtype != "f32" or w.dtype != "f32":
        raise UnsupportedKernelError(f"the cpu gemm kernel is fp32, got {x.dtype} x {w.dtype}")
    if steps.count("gated_silu") > 1:
        raise UnsupportedKernelError("more than one gated_silu in one epilogue")
    if not all(isinstance(d, int) for d in w.shape):
        raise UnsupportedKernelError(f"gemm weight {w} must have static sizes")
    ranks = tuple(1 if v.type.rank == 1 else 2 for v in node.inputs[2:])
    layout = node.attrs.get("weight_layout")
    if layout is None:
        return GemmSpec(w.shape[1], w.shape[0], steps, ranks, x.dtype)
    if layout != "k16":
        raise UnsupportedKernelError(f"the cpu gemm kernel reads weights [N, K] or k16 panels, not {layout}")
    return GemmSpec(w.shape[1], node.attrs["n"], steps, ranks, x.dtype, layout)


# ----------------------------------------------------------------------------- epilogue
def epilogue(spec: GemmSpec, acc, extras: list, m, j) -> tirx.PrimExpr:
    """The output at (m, j) from `acc(h)`, the accumulator of half h at column j."""
    values = [acc(h) for h in range(spec.halves)]
    pending = iter(extras)
    for step in spec.steps:
        if step in _WITH_INPUT:
            extra = next(pending)
            cols = [h * spec.n_out + j if len(values) == 2 else j for h in range(len(values))]
            values = [v + (extra[c] if len(extra.shape) == 1 else extra[m, c]) for v, c in zip(values, cols)]
        elif step == "gated_silu":
            values = [ACTIVATIONS["silu"](values[0]) * values[1]]
        else:
            values = [ACTIVATIONS[step](v) for v in values]
    return values[0]


def _placeholders(spec: GemmSpec, M):
    dtype = tir_dtype(spec.dtype)
    x = te.placeholder((M, spec.K), dtype, name="x")
    shape = (spec.N, spec.K) if spec.layout is None else packed_weight_shape(spec.N, spec.K, spec.halves)
    w = te.placeholder(shape, dtype, name="w")
    extras, widths = [], _extra_widths(spec)
    for i, (rank, width) in enumerate(zip(spec.extra_ranks, widths)):
        shape = (width,) if rank == 1 else (M, width)
        extras.append(te.placeholder(shape, dtype, name=f"extra{i}"))
    return x, w, extras


def _extra_widths(spec: GemmSpec) -> list:
    """Each extra input's last dim: N before a gated_silu, N/2 after it."""
    widths, width = [], spec.N
    for step in spec.steps:
        if step in _WITH_INPUT:
            widths.append(width)
        elif step == "gated_silu":
            width //= 2
    return widths


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# ----------------------------------------------------------------------------- [N, K]: gemv (decode)
def gemv_func(spec: GemmSpec, mr: int = 1, rows_per_tile: int = 8) -> tirx.PrimFunc:
    """Dot-product form straight from w's rows; see the module docstring.

    A register tile is `mr` rows of x times `rows_per_tile` rows of w (split over the
    halves), one vector accumulator each, summed over lanes at the end.
    """
    H, K, lanes = spec.halves, spec.K, vector_lanes()
    nr = rows_per_tile // H  # weight rows per half in a register tile
    nb = 8 * nr  # columns per parallel block
    M = tirx.Var("M", "int32")
    x, w, extras = _placeholders(spec, M)
    half, padded = spec.n_out, _round_up(spec.n_out, nb)
    rows = M if mr == 1 else tirx.floordiv(M + mr - 1, mr) * mr
    ko = te.reduce_axis((0, -(-K // lanes)), name="ko")

    def product(m, h, j, lane):
        k = ko * lanes + lane
        value = x[m if mr == 1 else tirx.min(m, M - 1), k] * w[h * half + tirx.min(j, half - 1), k]
        return value if K % lanes == 0 else tirx.if_then_else(k < K, value, const(0.0, value))

    partial = te.compute((rows, H, padded, lanes), lambda m, h, j, lane: te.sum(product(m, h, j, lane), axis=ko),
                         name="partial")
    lane = te.reduce_axis((0, lanes), name="lane")
    acc = te.compute((rows, H, padded), lambda m, h, j: te.sum(partial[m, h, j, lane], axis=lane), name="acc")
    out = te.compute((M, spec.n_out), lambda m, j: epilogue(spec, lambda h: acc[m, h, j], extras, m, j), name="out")
    sch = s_tir.Schedule(te.create_prim_func([x, w, *extras, out]))
    b_out, b_acc, b_part = (sch.get_sblock(n) for n in ("out", "acc", "partial"))
    m, j = sch.get_loops(b_out)
    j_block, j_tile, j_row = sch.split(j, [None, nb // nr, nr])
    m_tile, m_row = sch.split(m, [None, mr])
    sch.reorder(j_block, j_tile, m_tile, m_row, j_row)
    sch.compute_at(b_acc, m_tile, preserve_unit_loops=True)
    sch.compute_at(b_part, m_tile, preserve_unit_loops=True)
    p_m, p_h, p_j, p_lane, p_k = sch.get_loops(b_part)[-5:]
    sch.reorder(p_k, p_m, p_h, p_j, p_lane)
    sch.vectorize(p_lane)
    for loop in (p_m, p_h, p_j, *sch.get_loops(b_acc)[-4:], m_row, j_row):
        sch.unroll(loop)
    sch.parallel(j_block)
    sch.decompose_reduction(b_part, p_k)
    return sch.mod["main"]


# ----------------------------------------------------------------------------- panels: every k16 form, [N, K] gemm
def panel_func(spec: GemmSpec, mr: int, panels: int, block_tiles: int) -> tirx.PrimFunc:
    """Outer-product form over k16 panels (see the module docstring): a register tile of
    `mr` rows of x times `panels` panels (each H halves x 16/H columns), `block_tiles`
    tiles per parallel block. A k16 w is read as it is; an [N, K] w is packed into k16
    panels per call, each parallel block packing its own."""
    H, K = spec.halves, spec.K
    c = PANEL // H  # columns of one half in a panel
    nb = panels * c  # output columns of a register tile
    M = tirx.Var("M", "int32")
    x, w, extras = _placeholders(spec, M)
    half, padded = spec.n_out, _round_up(spec.n_out, nb * block_tiles)
    if spec.layout is None:
        w_panels = te.compute((padded // c, K, PANEL), lambda p, k, q: w[q // c * half + tirx.min(p * c + q % c, half - 1), k],
                              name="w_packed")
    else:
        w_panels = w
    last = w_panels.shape[0] - 1
    rows = M if mr == 1 else tirx.floordiv(M + mr - 1, mr) * mr
    k = te.reduce_axis((0, K), name="k")

    def product(m, h, j):
        row = m if mr == 1 else tirx.min(m, M - 1)
        return x[row, k] * w_panels[tirx.min(j // c, last), k, h * c + j % c]

    acc = te.compute((rows, H, padded), lambda m, h, j: te.sum(product(m, h, j), axis=k), name="acc")
    out = te.compute((M, spec.n_out), lambda m, j: epilogue(spec, lambda h: acc[m, h, j], extras, m, j), name="out")
    sch = s_tir.Schedule(te.create_prim_func([x, w, *extras, out]))
    b_out, b_acc = sch.get_sblock("out"), sch.get_sblock("acc")
    m, j = sch.get_loops(b_out)
    j_block, j_tile, j_panel, j_col = sch.split(j, [None, block_tiles, panels, c])
    m_tile, m_row = sch.split(m, [None, mr])
    sch.reorder(j_block, m_tile, j_tile, m_row, j_panel, j_col)
    sch.compute_at(b_acc, j_tile, preserve_unit_loops=True)
    if spec.layout is None:
        b_pack = sch.get_sblock("w_packed")
        sch.compute_at(b_pack, j_block, preserve_unit_loops=True)
        sch.vectorize(sch.get_loops(b_pack)[-1])
    a_m, a_h, a_j, a_k = sch.get_loops(b_acc)[-4:]
    a_p, a_c = sch.split(a_j, [panels, c])
    sch.reorder(a_k, a_m, a_p, a_h, a_c)
    sch.vectorize(a_c)
    for loop in (a_m, a_p, a_h, m_row, j_panel):
        sch.unroll(loop)
    if spec.n_out % c == 0:
        sch.vectorize(j_col)
    sch.parallel(j_block)
    sch.decompose_reduction(b_acc, a_k)
    return sch.mod["main"]


# ----------------------------------------------------------------------------- kernel
def generate(group: Graph) -> tuple:
    """(kernel name, {function name: scheduled PrimFunc})."""
    spec = spec_of(single_node(group))
    if spec.layout is None:
        return spec.name, {"gemv1": gemv_func(spec, 1, 8), "gemv": gemv_func(spec, 2, 4),
                           "gemm": panel_func(spec, *PANEL_TILES["gemm"])}
    return spec.name, {form: panel_func(spec, *tiles) for form, tiles in PANEL_TILES.items()}


def make_run(group: Graph, functions):
    """run(*group inputs): flatten x's leading dims, allocate the output, pick the form.

    Forms by row count: 1 -> gemv1, up to GEMV_MAX_ROWS -> gemv, above -> gemm (their
    tiles depend on w's layout; see the module docstring). The common call (2-D, aligned
    tensors) goes straight to TVM, which checks shapes and strides itself; operands that
    are strided, broadcast or not 64-byte aligned are reshaped and copied first
    (codegen/memory.py).
    """
    node = single_node(group)
    spec, positions = spec_of(node), operand_positions(group, node)
    return rows_run(functions, spec.K, spec.n_out, _extra_widths(spec), positions[0], positions[1:2], positions[2:])


def rows_run(functions: dict, K: int, n_out: int, widths: list, x_at: int, weight_at: list, extra_at: list,
             forms: tuple = GEMV_FORMS):
    """`make_run` of a gemm-like kernel (gemm, qgemm): x at `x_at` is flattened to rows,
    its weight tensors (at `weight_at`) and epilogue inputs (at `extra_at`, of last dims
    `widths`) passed on, and the form picked by rows: the first of `forms` ((most rows,
    name), in order) that takes them, else gemm."""
    by_rows = [(most, functions[name]) for most, name in forms]
    gemm = functions["gemm"]

    def call(x2, weights, extras, out2):
        rows = x2.shape[0]
        if rows:
            form = next((f for most, f in by_rows if rows <= most), gemm)
            form(x2, *weights, *extras, out2)

    def run(*args):
        x = args[x_at]
        lead = x.shape[:-1]
        out = torch.empty((*lead, n_out), dtype=x.dtype)
        weights, extras = [args[i] for i in weight_at], [args[i] for i in extra_at]
        if x.dim() == 2 and all(t.data_ptr() % KERNEL_ALIGNMENT == 0 for t in (x, *extras)):
            try:  # weights are aligned at compile time (api.compile)
                call(x, weights, extras, out)
                return out
            except ValueError:  # a strided or broadcast operand: take the general path
                pass
        x2 = kernel_ready(x.reshape(-1, K))
        rows = x2.shape[0]
        extras = [kernel_ready(_flat_extra(t, lead, width, rows)) for t, width in zip(extras, widths)]
        call(x2, [kernel_ready(w) for w in weights], extras, out.view(rows, n_out))
        return out

    return run


def _flat_extra(t: torch.Tensor, lead: tuple, width: int, rows: int) -> torch.Tensor:
    """A bias stays [width]; a residual becomes [rows, width], broadcast if it must be."""
    if t.dim() == 1:
        return t
    if t.shape[:-1] != lead:
        t = t.expand(*lead, width)
    return t.reshape(rows, width)


def program_call(group: Graph, forms: dict, operands: list, ctx):
    """`make_run` in the cpu program (program.py): rows flattened, the form chosen by rows."""
    node = single_node(group)
    spec, positions = spec_of(node), operand_positions(group, node)
    x_type = node.inputs[0].type
    lead = ctx.shape(x_type)[:-1]
    rows = ctx.product(lead)
    x = ctx.reshape(operands[positions[0]], [rows, spec.K])
    extras = []
    for at, width in zip(positions[2:], _extra_widths(spec)):
        value, extra_type = operands[at], group.inputs[at].type
        if extra_type.rank > 1:
            if list(extra_type.shape[:-1]) != list(x_type.shape[:-1]):
                value = ctx.broadcast(value, [*lead, width])
            value = ctx.reshape(value, [rows, width])
        extras.append(value)
    args, out, dtype = [x, operands[positions[1]], *extras], [rows, spec.n_out], tir_dtype(spec.dtype)

    def form(name):
        return lambda: ctx.call(forms[name], args, out, dtype)

    return ctx.reshape(choose_by_rows(ctx, rows, form, GEMV_FORMS), [*lead, spec.n_out])


def choose_by_rows(ctx, rows, form, forms: tuple):
    """The program's call of the form `rows_run` picks: the first of `forms` taking `rows`."""
    return ctx.choose([(rows == 1 if most == 1 else rows <= most, form(name)) for most, name in forms], form("gemm"))
