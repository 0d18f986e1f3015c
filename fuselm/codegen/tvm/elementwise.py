"""Any group of pointwise, view, reduction, gather and rope ops: lowered through the
op -> TE table (`lowering.py`), then one generic schedule.

The schedule, in order:
1. every intermediate injective compute is inlined into its readers, so a chain of
   views and pointwise ops becomes one loop nest that reads the inputs once;
2. the output's leading dims are fused into one parallel loop (2 cores), its last dim
   is split by the vector width and vectorized when it divides (a single dim read by a
   reduction over an outer dim: in rows of 4 vectors, so it accumulates 4 at once);
3. each reduction whose result is indexed first by those leading dims (softmax's row
   max and sum, a mean over the last dim, attention's row of scores) is computed
   inside the parallel loop, row by row, while the row is in cache; any other
   reduction runs on its own, parallel over its own output. Which is which follows from
   how the output reads it, not from its shape (`_OutputAxes`): softmax over dim 1 of
   [b, n, n] has a max of shape [b, n] as its rows are, but per (b, column), which
   each row reads whole (lowering.py has it read the input by rows there, into vectors
   of adjacent columns' results: `_read_rows`). A reduction over a static
   multiple of the vector width is split per lane first (rfactor: a vector of partial
   results, then a sum of lanes), so its inner loop is vectorized too. A compute whose
   name ends in `_kept` is treated like a reduction (materialized per row, not
   inlined): attention keeps its row of probabilities so that exp runs once per score;
4. refinements the lowering left for its own blocks (attention's vector dot products).
The kernel takes the group's symbol values as leading scalar arguments, then the
group's inputs, then the output.
"""
from __future__ import annotations

import torch
from tvm import s_tir, te, tirx
from tvm.s_tir.schedule import ScheduleError

from ...ir.graph import Graph
from ..kernel import group_key
from ..memory import kernel_ready
from . import attention, varlen_lowering
from .build import SERIAL_MAX, Dims, OutputShape, ShapeBinder, tir_dtype, vector_lanes
from .lowering import LOWER, lower

LOWERING_MODULES = (attention, varlen_lowering)  # their imports add attention, pack and unpack to LOWER
OPS = tuple(LOWER)
_REDUCE = 2  # IterVar.CommReduce
KEEP = "_kept"  # a compute named so is materialized (per row), not inlined
_ROW_VECTORS = (4,)  # vectors per row of a one-dim output (its reductions: independent accumulators)


def generate(group: Graph) -> tuple:
    """Lower and schedule `group`: (kernel name, {"main": parallel, "serial": serial PrimFunc})."""
    if attention.tiled_supported(group):  # a lone attention: query tiles, in TVMScript
        return attention.tiled_generate(group)
    ops = list(dict.fromkeys(node.op for node in group.nodes))
    name = "_".join(["fused", *ops[:4], group_key(group, "cpu")[:6]])
    return name, {"main": _scheduled(group, parallel=True), "serial": _scheduled(group, parallel=False)}


def _scheduled(group: Graph, parallel: bool) -> tirx.PrimFunc:
    dims = Dims()
    placeholders, out, ctx = lower(group, dims)
    symbols = ShapeBinder(group.inputs).symbols
    sch = s_tir.Schedule(te.create_prim_func([dims.var(s) for s in symbols] + placeholders + [out]))
    schedule(sch, parallel)
    for refine in ctx.refinements:
        refine(sch)
    return sch.mod["main"]


def make_run(group: Graph, functions):
    """run(*inputs): symbol values read from the shapes, the output allocated, one call
    (the serial twin when no tensor reaches SERIAL_MAX elements: waking the pool costs more)."""
    if attention.tiled_supported(group):
        return attention.tiled_make_run(group, functions)
    binder, parallel, serial = ShapeBinder(group.inputs), functions["main"], functions["serial"]
    out_type = group.outputs[0].type
    out_shape = OutputShape(out_type.shape, binder.symbols)

    def run(*args):
        sizes = binder.values(args)
        out = torch.empty(out_shape(sizes), dtype=out_type.torch_dtype)
        args = [kernel_ready(a) for a in args]  # TVM takes compact, aligned tensors
        work = max(out.numel(), *(a.numel() for a in args)) if args else out.numel()
        (serial if work < SERIAL_MAX else parallel)(*sizes, *args, out)
        return out

    return run


# ----------------------------------------------------------------------------- schedule
def is_reduction(sch, block) -> bool:
    return any(iv.iter_type == _REDUCE for iv in sch.get(block).iter_vars)


def schedule(sch: s_tir.Schedule, parallel: bool = True) -> None:
    root = sch.get_sblock("root")
    output_names = {sch.get(b).name_hint for b in sch.get_output_blocks(root)}
    lane_blocks = set() if _rows_are_chunks(sch, root, output_names) else _split_reductions_by_lane(sch, root, output_names)
    for block in reversed(sch.get_child_blocks(root)):
        name = sch.get(block).name_hint
        if name not in output_names and not name.endswith(KEEP) and not is_reduction(sch, block):
            try:
                sch.compute_inline(block)
            except ScheduleError:
                pass  # stays a loop nest of its own, scheduled below
    (out,) = [b for b in sch.get_child_blocks(root) if sch.get(b).name_hint in output_names]
    columns = any(sch.get(b).name_hint not in output_names and _unit_last(sch, b) for b in sch.get_child_blocks(root))
    rows, vector, row_axes = _split_output(sch, out, wide=columns and not lane_blocks)
    out_shape = _shape_without_ones(sch.get(out).writes[0].source.shape)
    row_shape = out_shape[:-1] if len(out_shape) > 1 else out_shape
    vector_sums = []
    axes = _OutputAxes(sch, out, row_axes)
    for block in reversed(sch.get_child_blocks(root)):
        name = sch.get(block).name_hint
        if name in output_names:
            continue
        shape = _shape_without_ones(sch.get(block).writes[0].source.shape)
        if rows is not None and shape[: len(row_shape)] == row_shape and axes.per_row(block):
            try:
                sch.compute_at(block, rows, preserve_unit_loops=True)
                axes.at_rows(block)
                if name in lane_blocks:
                    vector_sums.append(_vectorize_lanes(sch, block))
                continue
            except ScheduleError:
                pass
        if parallel:
            parallel_alone(sch, block)
    if rows is not None and parallel:
        sch.parallel(rows)
    if vector is not None:
        sch.vectorize(vector)
    for block, loop in vector_sums:  # after parallel(), which wants reduction blocks whole
        sch.decompose_reduction(block, loop)


def _split_reductions_by_lane(sch, root, output_names: set) -> set:
    """rfactor each intermediate reduction whose innermost reduced loop is a static
    multiple of the vector width: one partial result per lane (a vector accumulator),
    then a sum of lanes. Returns the names of the per-lane blocks."""
    lanes, names = vector_lanes(), set()
    for block in sch.get_child_blocks(root):
        if not is_reduction(sch, block) or sch.get(block).name_hint in output_names:
            continue
        loop = sch.get_loops(block)[-1]
        extent = _static(sch.get(loop).extent)
        if sch.get(block).iter_vars[-1].iter_type != _REDUCE or extent is None or extent % lanes or extent < 2 * lanes:
            continue
        try:
            chunk, lane = sch.split(loop, [None, lanes])
            names.add(sch.get(sch.rfactor(lane, len(sch.get(block).writes[0].source.shape))).name_hint)
        except ScheduleError:
            pass  # not a reduction rfactor can split (e.g. one with a non-commutative body)
    return names


def _vectorize_lanes(sch, block):
    """Lanes innermost and vectorized in an rfactor block; returns (block, its reduce loop).

    The block's loops under the row loop follow its iter vars: rfactor puts the lane
    var first and the reduced chunk var last.
    """
    own = sch.get_loops(block)[-len(sch.get(block).iter_vars):]
    lane, chunk = own[0], own[-1]
    sch.reorder(chunk, lane)
    sch.vectorize(lane)
    return block, chunk


def _shape_without_ones(shape) -> list:
    return [str(d) for d in shape if not (isinstance(d, tirx.IntImm) and d.value == 1)]


def _static(extent):
    return extent.value if isinstance(extent, tirx.IntImm) else None


def _rows_are_chunks(sch, root, output_names: set) -> bool:
    """Whether `_split_output` will cut a single output dim into chunks (no vector dim): a
    reduction computed per chunk then cannot be split by lanes (TVM fails to build it)."""
    (out,) = [b for b in sch.get_child_blocks(root) if sch.get(b).name_hint in output_names]
    spatial = [iv for iv in sch.get(out).iter_vars if iv.iter_type != _REDUCE and _static(iv.dom.extent) != 1]
    if len(spatial) != 1 or is_reduction(sch, out):
        return False
    last, lanes = _static(spatial[0].dom.extent), vector_lanes()
    return not (last is not None and last % lanes == 0 and last >= lanes)


def _unit_last(sch, block) -> bool:
    """Whether a block's last iter var is a unit reduce axis: the lowering's mark of a
    reduction over an outer dim, read by rows (lowering.py's `by_rows`)."""
    iter_vars = sch.get(block).iter_vars
    return bool(iter_vars) and iter_vars[-1].iter_type == _REDUCE and _static(iter_vars[-1].dom.extent) == 1


def _split_output(sch, block, wide: bool = False):
    """Fuse the output's leading spatial loops (the rows), split its last for vectors.
    `wide`: a single dim comes in rows of a few vectors (a reduction over an outer dim
    computed per row then accumulates that many vectors at once). Returns (rows loop,
    vector loop, the positions of the output's iter vars the rows loop runs over)."""
    loops = sch.get_loops(block)
    iter_vars = sch.get(block).iter_vars
    axes = [a for a, (_, iv) in enumerate(zip(loops, iter_vars)) if iv.iter_type != _REDUCE]
    spatial = [loops[a] for a in axes]
    if not spatial:
        return None, None, []
    lanes = vector_lanes()
    if is_reduction(sch, block):
        return sch.fuse(*spatial), None, axes
    last = _static(sch.get(spatial[-1]).extent)
    vector = None
    vectors = next((v for v in _ROW_VECTORS if wide and len(spatial) == 1 and last is not None
                    and last % (v * lanes) == 0 and last > v * lanes), 1)
    if vectors > 1:  # a single dim: rows of a few vectors (a reduction computed per row gets that many)
        outer, middle, vector = sch.split(spatial[-1], [None, vectors, lanes])
        spatial = [outer, middle]
        axes = axes + axes[-1:]  # both loops run over the one dim; the rows are the outer
    elif last is not None and last % lanes == 0 and last > lanes:
        spatial[-1], vector = sch.split(spatial[-1], [None, lanes])
    elif last == lanes:
        vector = spatial.pop()
        axes = axes[:-1]
    if not spatial:
        return None, vector, []
    if len(spatial) == 1 and vector is None:  # a single dim: rows are chunks of it
        rows, _ = sch.split(spatial[0], [None, 4 * lanes])
        return rows, None, axes
    rows = sch.fuse(*spatial[:-1]) if len(spatial) > 1 else spatial[0]
    return rows, vector, axes[:-1] if len(spatial) > 1 else axes


class _OutputAxes:
    """Which of the output's iter vars each block's elements depend on, as its readers
    read it (the output first, then each block computed per row, consumers before
    producers): whether a block may be computed per row. It may when one row's region of
    it is its own: each element read fixes every (non-unit) iter var of the rows loop,
    through an index that depends on those alone (no reduce var of a reader, nothing
    but a point). A reduction over an outer dim read by broadcast (softmax over dim 1 of
    [b, n, n]: a max per (b, column), the rows (b, row)) does not fix the row: computed
    per row, it would be recomputed whole for each row; it runs on its own instead.
    Shapes alone cannot tell (there [b, n] either way)."""
    FREE = -1  # a dependence on something but the output's iter vars (a reader's reduce var, a range)

    def __init__(self, sch, out, row_axes: list):
        self.sch = sch
        iter_vars = sch.get(out).iter_vars
        self.rows = {a for a in row_axes if _static(iter_vars[a].dom.extent) != 1}
        self.readers = [(sch.get(out), {iv.var: frozenset([a] if iv.iter_type != _REDUCE else [self.FREE])
                                        for a, iv in enumerate(iter_vars)})]  # (block, {iter var: dependences})

    def _deps(self, expr, deps: dict) -> frozenset:
        found = set()
        for var in tirx.analysis.undefined_vars(expr, []):
            found |= next((d for v, d in deps.items() if v.same_as(var)), frozenset())  # else a symbol
        return frozenset(found)

    def _accesses(self, block):
        """(reader's dependences, the region read) for each read of `block`'s buffer."""
        buffer = self.sch.get(block).writes[0].source
        for reader, deps in self.readers:
            for read in reader.reads:
                if read.source.same_as(buffer):
                    yield deps, read.region

    def per_row(self, block) -> bool:
        accesses = list(self._accesses(block))
        if not accesses:
            return False  # read only by a block not computed per row
        readers = {reader.name_hint for reader, _ in self.readers}
        if any(self.sch.get(c).name_hint not in readers for c in self.sch.get_consumers(block)):
            return False  # a reader runs on its own, outside the rows loop
        for deps, region in accesses:
            fixed = set()
            for r in region:
                d = self._deps(r.min, deps) | self._deps(r.extent, deps)
                if _static(r.extent) == 1 and self.FREE not in d and d <= self.rows:
                    fixed |= d
            if not self.rows <= fixed:
                return False
        return True

    def at_rows(self, block) -> None:
        """`block` computed per row: its own iter vars' dependences, from its readers' indices."""
        body = self.sch.get(block)
        write = body.writes[0].region
        found = {}
        for deps, region in self._accesses(block):
            for r, w in zip(region, write):
                d = self._deps(r.min, deps) | self._deps(r.extent, deps)
                if _static(r.extent) != 1:
                    d |= {self.FREE}
                for var in tirx.analysis.undefined_vars(w.min, []):
                    found[var] = found.get(var, frozenset()) | d
        own = {}
        for iv in body.iter_vars:
            d = next((d for v, d in found.items() if v.same_as(iv.var)), frozenset([self.FREE]))
            own[iv.var] = d if iv.iter_type != _REDUCE else frozenset([self.FREE])
        self.readers.append((body, own))


def parallel_alone(sch, block) -> None:
    """A block left at the root: parallel over its outer loop when that one is spatial."""
    loops = sch.get_loops(block)
    if loops:
        try:
            sch.parallel(loops[0])
        except ScheduleError:
            pass  # a reduction's outer loop (rfactor reorders iter vars): stays serial


def program_call(group: Graph, forms: dict, operands: list, ctx):
    """`make_run`'s choice in the cpu program (program.py): the serial twin below SERIAL_MAX."""
    if attention.tiled_supported(group):
        return attention.tiled_program_call(group, forms, operands, ctx)
    out_type = group.outputs[0].type
    shape, dtype = ctx.shape(out_type), tir_dtype(out_type.dtype)
    args = ctx.symbol_args(group) + list(operands)
    work = ctx.largest([out_type, *(v.type for v in group.inputs)])
    return ctx.choose([(work < SERIAL_MAX, lambda: ctx.call(forms["serial"], args, shape, dtype))],
                      lambda: ctx.call(forms["main"], args, shape, dtype))
