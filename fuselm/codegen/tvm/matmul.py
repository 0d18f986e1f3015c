"""matmul(a, b): torch.matmul on operands of rank >= 2, batch dims broadcast.

out[..., m, n] = sum_k a[..., m, k] * b[..., k, n]; each operand's batch dims broadcast
to the output's as the IR types say (a static 1 is read at index 0, a missing dim is
not read), so a [H, M, K] @ [K, N] kernel reads b once for every head. fp16 and bf16
accumulate in fp32 (as torch does on cpu), other dtypes in their own.

The schedule is the BLIS structure of `gemm.py`, with the batch as an outer loop:
- b is packed per call into panels [K, NR] (NR = NV vectors of columns), one panel per
  parallel work item, kept in L2 while every row tile of its row block runs against
  it; the pack reads b through its index map (so a transposed b is read in place,
  column by column) and clamps the column index, so the padding needs no guard. With
  at most DIRECT_ROWS rows (static) the product reads b in place instead;
- the register tile (`tile_of`) is MR rows x NR columns: per k, MR broadcasts of a and
  NV vector loads of the panel feed MR x NV vector accumulators (the reduction over K
  stays in registers), stored once at the end of K;
- parallel over (batch, row block, column panel), fused into one loop; rows are padded
  to whole tiles by clamping a's row index, and only the stores are predicated.

Each module holds two functions: "nn" reads b as [..., K, N], "nt" reads b given as
its transpose [..., N, K] (what `b.transpose(-1, -2)` of a compact tensor is: the
q @ k^T of attention), and a serial twin of each for small products (waking the thread
pool costs more than they do). `run` takes b in place when it is either of those,
compact and aligned, and copies it otherwise (codegen/memory.py); likewise a. Symbolic
sizes stay TIR variables passed as leading scalars: one build serves every size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tvm import s_tir, te, tirx

from ...errors import UnsupportedKernelError
from ...ir.graph import Graph
from ..kernel import group_key
from ..memory import KERNEL_ALIGNMENT, kernel_ready
from .build import SERIAL_MAX, Dims, OutputShape, ShapeBinder, operand_positions, single_node, tir_dtype, vector_lanes

OPS = ("matmul",)
MR = 6  # rows of a register tile (fewer when a static M has fewer)
ROW_BLOCK = 8  # register tiles per row block (one parallel work item, one packed panel)
DIRECT_ROWS = 4  # up to so many (static) rows b is read in place: packing would cost as much as the product
_ACCUMULATE = {"float16": "float32", "bfloat16": "float32"}
_WIDE = ("float64", "int64")  # half as many lanes per vector
SERIAL_WORK = 16  # products below SERIAL_WORK * SERIAL_MAX multiply-adds run serially


@dataclass(frozen=True)
class Tile:
    """The register tile: `rows` of a times `vectors` vectors of `lanes` columns."""

    rows: int
    vectors: int
    lanes: int
    packed: bool  # b packed into panels per work item, or read in place

    @property
    def columns(self) -> int:
        return self.vectors * self.lanes


def tile_of(node, b_transposed: bool) -> Tile:
    """MR rows x 4 vectors with 32 vector registers (AVX-512), x 2 with 16: the
    accumulators, a vector of b per column vector and a broadcast of a all fit. Fewer
    rows or vectors when a static M or N is smaller, as many vectors as divide a static N
    (so that no column index needs clamping: a clamped vector load is a gather)."""
    acc = tir_dtype(node.type.dtype)
    acc = _ACCUMULATE.get(acc, acc)
    lanes = vector_lanes() // (2 if acc in _WIDE else 1)
    vectors = 4 if vector_lanes() == 16 else 2
    M, N = node.inputs[0].type.shape[-2], node.inputs[1].type.shape[-1]
    if isinstance(N, int):
        vectors = max(1, min(vectors, -(-N // lanes)))
        vectors = next((v for v in range(vectors, 0, -1) if N % (v * lanes) == 0), vectors)
    rows = min(MR, M) if isinstance(M, int) else MR
    divides = isinstance(N, int) and N % (vectors * lanes) == 0
    direct = isinstance(M, int) and M <= DIRECT_ROWS and divides and not b_transposed
    return Tile(rows, vectors, lanes, packed=not direct)


def _batch_index(shape, bat: tuple) -> list:
    """An operand's batch index within the output's batch index `bat` (broadcast)."""
    offset = len(bat) - len(shape)
    return [0 if isinstance(d, int) and d == 1 else bat[offset + j] for j, d in enumerate(shape)]


def matmul_func(node, symbols: list, b_transposed: bool, parallel: bool = True) -> tirx.PrimFunc:
    """The scheduled kernel of one matmul node; see the module docstring."""
    a_type, b_type, out_type = node.inputs[0].type, node.inputs[1].type, node.type
    tile, dims = tile_of(node, b_transposed), Dims()
    dtype = tir_dtype(out_type.dtype)
    acc_dtype = _ACCUMULATE.get(dtype, dtype)
    M, K, N = dims(a_type.shape[-2]), dims(a_type.shape[-1]), dims(b_type.shape[-1])
    b_shape = b_type.shape[:-2] + ((b_type.shape[-1], b_type.shape[-2]) if b_transposed else b_type.shape[-2:])
    a = te.placeholder(dims.shape(a_type.shape), dtype, name="a")
    b = te.placeholder(dims.shape(b_shape), dtype, name="b")
    batch = dims.shape(out_type.shape[:-2])
    nr = tile.columns
    panels = tirx.floordiv(N + nr - 1, nr)
    rows = tirx.floordiv(M + tile.rows - 1, tile.rows) * tile.rows

    def b_at(bat, k, n):  # b[k, n], its column clamped: the padding reads the last one
        index, n = _batch_index(b_type.shape[:-2], bat), tirx.min(n, N - 1)
        return (b(*index, n, k) if b_transposed else b(*index, k, n)).astype(acc_dtype)

    pack = te.compute((*batch, panels, K, nr), lambda *i: b_at(i[:-3], i[-2], i[-3] * nr + i[-1]), name="b_packed")
    k = te.reduce_axis((0, K), name="k")

    def product(*i):
        bat, m, n = i[:-2], i[-2], i[-1]
        row = a(*_batch_index(a_type.shape[:-2], bat), tirx.min(m, M - 1), k).astype(acc_dtype)
        return row * (pack(*bat, n // nr, k, n % nr) if tile.packed else b_at(bat, k, n))

    acc = te.compute((*batch, rows, panels * nr), lambda *i: te.sum(product(*i), axis=k), name="acc")
    out = te.compute((*batch, M, N), lambda *i: acc(*i).astype(dtype), name="out")
    func = te.create_prim_func([dims.var(s) for s in symbols] + [a, b, out])
    return _schedule(s_tir.Schedule(func), len(batch), tile, parallel)


def _schedule(sch: s_tir.Schedule, batch_rank: int, tile: Tile, parallel: bool) -> tirx.PrimFunc:
    b_out, b_acc = sch.get_sblock("out"), sch.get_sblock("acc")
    loops = sch.get_loops(b_out)
    bat = sch.fuse(*loops[:batch_rank]) if batch_rank else None
    m, n = loops[batch_rank:]
    m_block, m_tile, m_row = sch.split(m, [None, ROW_BLOCK, tile.rows])
    n_panel, n_col = sch.split(n, [None, tile.columns])
    outer = [lp for lp in (bat, m_block, n_panel) if lp is not None]
    sch.reorder(*outer, m_tile, m_row, n_col)
    work = sch.fuse(*outer)
    sch.compute_at(b_acc, m_tile, preserve_unit_loops=True)
    if tile.packed:  # one panel per work item, packed before its row tiles run
        b_pack = sch.get_sblock("b_packed")
        sch.compute_at(b_pack, work, preserve_unit_loops=True)
        sch.vectorize(sch.get_loops(b_pack)[-1])
    a_m, a_n, a_k = sch.get_loops(b_acc)[-3:]
    a_v, a_lane = sch.split(a_n, [tile.vectors, tile.lanes])
    sch.reorder(a_k, a_m, a_v, a_lane)
    sch.vectorize(a_lane)
    sch.unroll(a_m)
    sch.unroll(a_v)
    sch.vectorize(sch.split(n_col, [tile.vectors, tile.lanes])[1])
    if parallel:
        sch.parallel(work)
    sch.decompose_reduction(b_acc, a_k)
    return sch.mod["main"]


# ----------------------------------------------------------------------------- kernel
def generate(group: Graph) -> tuple:
    """(kernel name, {"nn"/"nt": b as it is / given transposed, and their "_serial" twins})."""
    node = single_node(group)
    if node.type.dtype == "bool":
        raise UnsupportedKernelError("matmul of bool tensors")
    symbols = ShapeBinder(group.inputs).symbols
    shape = "x".join(str(d) for d in node.inputs[0].type.shape[-2:] + node.inputs[1].type.shape[-1:])
    name = f"matmul_{node.type.dtype}_{shape}_{group_key(group, 'cpu')[:6]}"
    return name, {f"{form}{suffix}": matmul_func(node, symbols, form == "nt", parallel=not suffix)
                  for form in ("nn", "nt") for suffix in ("", "_serial")}


def _aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % KERNEL_ALIGNMENT == 0


def make_run(group: Graph, functions):
    """run(a, b): b in place when compact or the transpose of a compact tensor; the
    serial twins below SERIAL_WORK * SERIAL_MAX multiply-adds."""
    node = single_node(group)
    a_at, b_at = operand_positions(group, node)
    binder = ShapeBinder(group.inputs)
    out_shape = OutputShape(node.type.shape, binder.symbols)
    dtype = node.type.torch_dtype

    def run(*args):
        sizes = binder.values(args)
        a, b = kernel_ready(args[a_at]), args[b_at]
        out = torch.empty(out_shape(sizes), dtype=dtype)
        if out.numel() == 0:
            return out
        serial = "_serial" if out.numel() * a.shape[-1] < SERIAL_WORK * SERIAL_MAX else ""
        if b.mT.is_contiguous() and not b.is_contiguous() and _aligned(b):
            functions["nt" + serial](*sizes, a, b.mT, out)
        else:
            functions["nn" + serial](*sizes, a, kernel_ready(b), out)
        return out

    return run


def program_call(group: Graph, forms: dict, operands: list, ctx):
    """`make_run` in the cpu program (program.py): b as it is (the program's values are
    compact), the serial twin below SERIAL_WORK * SERIAL_MAX multiply-adds."""
    node = single_node(group)
    a_at, b_at = operand_positions(group, node)
    args = ctx.symbol_args(group) + [operands[a_at], operands[b_at]]
    shape, dtype = ctx.shape(node.type), tir_dtype(node.type.dtype)
    work = ctx.numel(node.type) * ctx.size(node.inputs[0].type.shape[-1])
    return ctx.choose([(work < SERIAL_WORK * SERIAL_MAX, lambda: ctx.call(forms["nn_serial"], args, shape, dtype))],
                      lambda: ctx.call(forms["nn"], args, shape, dtype))
