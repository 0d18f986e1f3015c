"""qgemm(x, *parts, *extras): gemm with a quantized weight (ir/quant_ops.py), on fp32 x.

The weight is read as the quantization passes store it: q (int8 [N, K], or 4-bit codes,
uint8 [N, 16C], in chunks of 32 along k), scale (and int4's offset) [N, G] in f16 or
f32, and LLM.int8's keep / w_keep. No form materializes the fp32 weight. The epilogue is
gemm.py's (`epilogue` over a `GemmSpec`): qgemm fuses what gemm fuses. As in gemm.py,
x [M..., K] is flattened to [M, K] and one module of three PrimFuncs is built for a
symbolic M; `run` picks `gemv1` (M = 1), `gemv2` (M = 2), `gemv` (M <= GEMV_MAX_ROWS) or
`gemm` by rows.

GEMV forms (decode), `gemv_func`: dot products that stream q's rows once, dequantizing
in registers. A register tile is `mr` rows of x times `nr` rows of q (gemv1 1 x 4, gemv2
2 x 2, gemv 4 x 2; a gated_silu tile holds the gate and up rows of its outputs), each
pair with `U` vector accumulators along k (vectors of `lanes()`: 16 with AVX-512, else
8). A parallel block is `slot` (16, or 8 when that splits better over the threads)
tiles: tile row r reads q rows r * slot + t for tiles
t = 0.., so each of the nr rows streams a contiguous run of q, and each prefetches
(llvm.prefetch, inserted after scheduling) the row it reads PREFETCH_BYTES ahead.
The group scale is out of the inner loop: per group, `part` = sum of code * x, then
`acc += part * scale[g]` and, for int4, `acc += xsum[g] * offset[g]` (xsum: x summed per
group and lane, once per call), two FMAs; f16 scales and offsets are converted once per
tile. Lanes are summed at the end. The code of an element:
  int8  q, sign-extended and converted;
  int4  its nibble: a chunk's 16 bytes hold 16 consecutive elements in their low nibbles
        and the next 16 in their high ones, so a vector's elements are consecutive
        bytes, zero-extended, then masked or shifted (vector loads, no gathers);
  nf4   NF4_LEVELS[nibble]: with AVX-512 one vpermps of the table (a vector
        constant); on AVX2 two of its halves and a blend on the nibble's bit 3; else
        a select tree.
int8 groups that are not whole vectors (group_size % lanes(), more than one group) scale
each element instead. x is read padded with zeros to whole vectors and groups (a copy, only
when K needs it), so inner loops have no masks; an int8 row (not padded in memory) then
clamps its column, which makes those loads gathers: right for any K, fast for the K
models have.

W8A8 (activations "int8": format int8, one scale per output channel): each row of x
(times `smooth`) is quantized first, as quantize_rows does (absmax over the row without
the kept features, the same f32 division, round half to even), into an int8 copy and a
row scale; the products are int8 x int8 summed in int32 vectors, and
y = acc * x_scale[row] * w_scale[col].

Outlier features (keep [O], w_keep [N, O], any format; keep's features distinct, as the
passes write them): the quantized part reads x with the kept features zeroed, so q's
values there do not count, and x[:, keep] @ w_keep.T in fp32 (smoothed x under W8A8) is
added before the epilogue, computed per parallel block.

The tiled form (prefill), `gemm_func`: gemm.py's BLIS micro-kernel (6 rows of x x 16
columns, 12 accumulators). Each parallel block owns 48 output columns: it unpacks their
q, scale and offset into fp32 k16 panels [3, K, 16] (int32 for W8A8), which stay in L2,
then runs every row of x against them: each weight is unpacked once per call (4-bit
codes vectorized along k, chunk by chunk, as the GEMV reads them, when K is whole
chunks).

Rows past M are clamped reads of x's last row and columns past N clamped rows of q;
only stores are predicated.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import tvm
import tvm_ffi
from tvm import s_tir, te, tirx

from ...errors import UnsupportedKernelError
from ...ir.core_ops import PANEL
from ...ir.graph import Graph
from ...ir.quant_ops import CHUNK, NF4_LEVELS, groups, packed_columns
from .build import as_expr, const, operand_positions, single_node, target, tir_dtype
from .gemm import GEMV_MAX_ROWS, PANEL_TILES, GemmSpec, _extra_widths, _round_up, choose_by_rows, epilogue, rows_run

OPS = ("qgemm",)
# GEMV register tiles: (rows of x, rows of q). A tile's unpacked weights serve its rows of
# x: 4 rows take 1.2-1.4x less time than 2 from M = 3 (8 and 16 rows too), 2 rows 1.5x
# less than 4 at M = 2 (benchmarks/tvm_kernels.py's shapes). A gated_silu tile holds the
# gate and up rows of its outputs: `gemv` then takes one of each (8 accumulators).
GEMV_TILES = {"gemv1": (1, 4), "gemv2": (2, 2), "gemv": (4, 2)}
QGEMV_FORMS = ((1, "gemv1"), (2, "gemv2"), (GEMV_MAX_ROWS, "gemv"))  # gemm.py's GEMV_FORMS, with gemv2
SLOT = 16  # rows of q each tile row streams through, per parallel block (see _slot)
PREFETCH_BYTES = 1536  # how far ahead of its reads each of a tile's rows of q prefetches (0: none)
PREFETCH_LOCALITY = 3  # llvm.prefetch's locality: 3 = into L1
QMAX = 127.0  # int8 activations: symmetric, as quantize_rows(bits=8)


@dataclass(frozen=True)
class QSpec:
    """What a qgemm node computes, with sizes: gemm's spec (K, N = q's rows, epilogue)
    and the weight's format."""

    gemm: GemmSpec
    format: str
    group_size: int
    scale_dtype: str  # TIR dtype of scale (and offset)
    activations: str
    parts: tuple  # part names, in input order
    outliers: int  # O, the kept features (0: none)

    @property
    def K(self) -> int:
        return self.gemm.K

    @property
    def G(self) -> int:
        return groups(self.K, self.group_size)

    @property
    def four_bit(self) -> bool:
        return self.format != "int8"

    @property
    def factored(self) -> bool:
        """The group scale comes out of the inner loop: each vector lies in one group."""
        return self.G == 1 or self.group_size % lanes() == 0

    @property
    def name(self) -> str:
        g = "c" if self.G == 1 else f"g{self.group_size}"
        extra = ["smooth"] * ("smooth" in self.parts) + [f"keep{self.outliers}"] * bool(self.outliers)
        return "_".join(["q" + self.gemm.name, f"{self.format}{g}", self.scale_dtype, f"a{self.activations}", *extra])


def spec_of(node) -> QSpec:
    attrs = node.attrs
    x = node.inputs[0].type
    parts = tuple(attrs["parts"])
    named = dict(zip(parts, (v.type for v in node.inputs[1:1 + len(parts)])))
    extras = node.inputs[1 + len(parts):]
    steps = tuple(attrs.get("epilogue", ()))
    if x.dtype != "f32" or any(v.type.dtype != "f32" for v in extras):
        raise UnsupportedKernelError(f"the cpu qgemm kernel takes fp32 x and epilogue inputs, got {x.dtype}")
    if steps.count("gated_silu") > 1:
        raise UnsupportedKernelError("more than one gated_silu in one epilogue")
    if not all(isinstance(d, int) for t in named.values() for d in t.shape):
        raise UnsupportedKernelError("qgemm weight parts must have static sizes")
    fmt, activations = attrs["format"], attrs.get("activations", "float")
    if activations == "int8" and (fmt != "int8" or groups(attrs["k"], attrs["group_size"]) != 1):
        raise UnsupportedKernelError(f"int8 activations need an int8 weight with one scale per channel, "
                                     f"got {fmt} with group_size {attrs['group_size']}")
    ranks = tuple(1 if v.type.rank == 1 else 2 for v in extras)
    gemm = GemmSpec(attrs["k"], attrs["n"], steps, ranks, "f32")
    outliers = named["keep"].shape[0] if "keep" in named else 0
    return QSpec(gemm, fmt, attrs["group_size"], tir_dtype(named["scale"].dtype), activations, parts, outliers)


# ----------------------------------------------------------------------------- what every form shares
class _Operands:
    """The kernel's placeholders and the stages before the main loop nest.

    `x_codes[m, k]` is x as the quantized part reads it (kept features zeroed; W8A8: int8),
    `width` columns wide, zeros past K (the GEMV forms read whole vectors and groups);
    `scale_x[m]` the W8A8 row scale, `outlier[m, n]` the fp32 outlier product (or None).
    """

    def __init__(self, spec: QSpec, M, width: int = None):
        self.spec, self.M, self.width = spec, M, width or spec.K
        K, N, G = spec.K, spec.gemm.N, spec.G
        sdt = spec.scale_dtype
        self.x = te.placeholder((M, K), "float32", name="x")
        shapes = {
            "smooth": ((K,), "float32"),
            "q": ((N, K), "int8") if not spec.four_bit else ((N, packed_columns(K)), "uint8"),
            "scale": ((N, G), sdt),
            "offset": ((N, G), sdt),
            "keep": ((spec.outliers,), "int64"),
            "w_keep": ((N, spec.outliers), "float32"),
        }
        self.parts = {name: te.placeholder(shapes[name][0], shapes[name][1], name=name) for name in spec.parts}
        self.extras = []
        for i, (rank, width) in enumerate(zip(spec.gemm.extra_ranks, _extra_widths(spec.gemm))):
            self.extras.append(te.placeholder((width,) if rank == 1 else (M, width), "float32", name=f"extra{i}"))
        self.stages = []  # names of the root stages made here, for the schedule
        self._prologue()

    @property
    def args(self) -> list:
        return [self.x, *(self.parts[n] for n in self.spec.parts), *self.extras]

    def smoothed(self, m, k):
        x = self.x[m, k]
        return x * self.parts["smooth"][k] if "smooth" in self.parts else x

    def _prologue(self):
        spec, K, M = self.spec, self.spec.K, self.M
        kept = None
        if spec.outliers:
            keep = self.parts["keep"]
            o = te.reduce_axis((0, spec.outliers), name="o")
            self.kept = te.compute((K,), lambda k: te.max(tirx.Select(keep[o] == tirx.Cast("int64", k),
                                                                      tirx.const(1, "int32"), tirx.const(0, "int32")),
                                                          axis=o), name="kept")
            kept = self.kept
            self.stages.append("kept")
        if spec.activations == "int8":
            k = te.reduce_axis((0, K), name="k")

            def magnitude(m, k):
                value = tirx.abs(self.smoothed(m, k))
                return value if kept is None else tirx.Select(kept[k] > 0, tirx.const(0.0, "float32"), value)

            amax = te.compute((M,), lambda m: te.max(magnitude(m, k), axis=k), name="amax")
            self.scale_x = te.compute((M,), lambda m: tirx.max(amax[m], tirx.const(1e-12, "float32"))
                                      / tirx.const(QMAX, "float32"), name="row_scale")

            def quantized(m, k):
                value = tirx.nearbyint(self.smoothed(m, k) / self.scale_x[m])
                value = tirx.max(tirx.min(value, tirx.const(QMAX, "float32")), tirx.const(-QMAX, "float32"))
                if kept is not None:
                    value = tirx.Select(kept[k] > 0, tirx.const(0.0, "float32"), value)
                return value.astype("int8")

            self.stages += ["amax", "row_scale"]
            self._codes(quantized)
        elif kept is not None:
            self._codes(lambda m, k: tirx.Select(kept[k] > 0, tirx.const(0.0, "float32"), self.x[m, k]))
        elif self.width > K:
            self._codes(lambda m, k: self.x[m, k])
        else:
            self.x_codes = self.x
        self.outlier = None
        if spec.outliers:
            w_keep, keep = self.parts["w_keep"], self.parts["keep"]
            o = te.reduce_axis((0, spec.outliers), name="o")
            self.outlier = te.compute((M, spec.gemm.N), lambda m, n: te.sum(
                self.smoothed(m, as_expr(keep[o]).astype("int32")) * w_keep[n, o], axis=o), name="outlier")

    def _codes(self, value):
        """x_codes [M, width]: value(m, k) for k < K, zeros past K."""
        K = self.spec.K

        def padded(m, k):
            v = value(m, k)
            return v if self.width == K else tirx.if_then_else(k < K, v, const(0, v))

        self.x_codes = te.compute((self.M, self.width), padded, name="x_codes")
        self.stages.append("x_codes")

    def scale(self, row, g):
        return as_expr(self.parts["scale"][row, g]).astype("float32")

    def offset(self, row, g):
        return as_expr(self.parts["offset"][row, g]).astype("float32")

    def code(self, row, k):
        """The weight's code at (row, k) as f32: int8 q, int4's nibble, nf4's level."""
        return weight_code(self.parts["q"], self.spec.format, row, k)

    def weight(self, row, k, by_chunks: bool = False):
        """The dequantized weight at (row, k), as f32 (the tiled form's unpacking). With
        `by_chunks` the loop over k is split into (chunk, high, byte half, lane) with the
        lane vectorized: 4-bit codes are then read as the GEMV reads them."""
        g = tirx.floordiv(k, self.spec.group_size)
        if by_chunks and self.spec.four_bit:
            byte = tirx.floordiv(k, CHUNK) * (CHUNK // 2) + tirx.floormod(k, CHUNK // 2)
            high = tirx.floormod(tirx.floordiv(k, CHUNK // 2), 2)
            code = _nibble_code(self, self.spec, row, byte, high, tirx.floormod(k, lanes()))
        else:
            code = self.code(row, k)
        value = code * self.scale(row, g)
        return value + self.offset(row, g) if self.spec.format == "int4" else value


def weight_code(q: te.Tensor, format: str, row, k) -> tirx.PrimExpr:
    """The code of a quantized weight's element (row, k) as f32, one scalar read of q:
    int8 q itself, int4's nibble (chunk layout: byte k // 32 * 16 + k % 16, its high
    nibble for k % 32 >= 16), nf4's level of that nibble. lowering.py's qembedding reads
    its rows this way too."""
    if format == "int8":
        return as_expr(q[row, k]).astype("float32")
    byte = as_expr(q[row, tirx.floordiv(k, CHUNK) * (CHUNK // 2) + tirx.floormod(k, CHUNK // 2)])
    high = tirx.floormod(tirx.floordiv(k, CHUNK // 2), 2)
    nibble = tirx.Select(high > 0, byte >> tirx.const(4, "uint8"), byte & tirx.const(15, "uint8"))
    return nibble.astype("float32") if format == "int4" else _nf4_level(nibble)


def _nf4_level(nibble) -> tirx.PrimExpr:
    """NF4_LEVELS[nibble] by a select tree on the nibble's bits (vectorizes: no gathers)."""
    bits = [(nibble >> const(b, nibble)) & const(1, nibble) for b in range(4)]

    def pick(lo: int, width: int):
        if width == 1:
            return tirx.const(NF4_LEVELS[lo], "float32")
        half = width // 2
        bit = width.bit_length() - 2
        return tirx.Select(bits[bit] > const(0, nibble), pick(lo + half, half), pick(lo, half))

    return pick(0, 16)


def _clamp_row(m, M, mr):
    return m if mr == 1 else tirx.min(m, M - 1)


# ----------------------------------------------------------------------------- GEMV: decode
def gemv_func(spec: QSpec, mr: int, nr: int) -> tirx.PrimFunc:
    """Dot-product form over q's rows, group scale factored out; see the module docstring.

    A register tile is `mr` rows of x times `nr` rows of q per half (gated_silu pairs
    gate and up rows in one tile), and `U` vectors along k with their own accumulators.
    A parallel block is `slot` rows of q per tile row: tile t reads q rows t, t + slot, ...,
    so that each of the `nr` rows streams a contiguous run of `slot` rows of q.
    """
    g_spec, K = spec.gemm, spec.K
    H, half = g_spec.halves, g_spec.n_out
    M = tirx.Var("M", "int32")
    w8a8, factored = spec.activations == "int8", spec.factored
    G = spec.G if factored else 1
    span = K if G == 1 else spec.group_size  # elements per group
    if spec.four_bit:  # a chunk's vectors: its low nibbles, then its high ones (see `position`)
        vectors = -(-span // CHUNK) * (CHUNK // lanes())
    else:
        vectors = -(-span // lanes())
    # x is read padded with zeros to whole groups and vectors: no masks in the inner
    # loop. 4-bit rows are stored padded to whole chunks; int8 rows are not, so an int8
    # row's last vector clamps its column (only when K is not whole vectors and groups).
    width = G * vectors * lanes()
    ops = _Operands(spec, M, width)
    slot = _slot(half, nr)
    nb = slot * nr  # columns per parallel block
    blocks = -(-half // nb)
    rows = M if mr == 1 else tirx.floordiv(M + mr - 1, mr) * mr
    # independent accumulator chains along k per row of q: about 4 per tile in all
    U = max(u for u in (1, 2, 4) if u <= max(1, 4 // (mr * nr)) and vectors % u == 0)
    if spec.four_bit:
        per_chunk = CHUNK // lanes()
        reduce = [te.reduce_axis((0, vectors // per_chunk), name="c")]
        if per_chunk // U > 1:
            reduce.append(te.reduce_axis((0, per_chunk // U), name="ph"))
    else:
        reduce = [te.reduce_axis((0, vectors // U), name="v")]
    # columns past q's row exist in x_codes only (int8 past K, 4-bit past whole chunks)
    row_bytes = packed_columns(K) if spec.four_bit else K
    ragged = (width // 2 if spec.four_bit else width) > row_bytes

    def position(g, u, lane, axes):
        """(k, q's column, high nibble) of lane `lane` of vector (axes, u) of group g."""
        if spec.four_bit:
            c, ph = axes if len(axes) == 2 else (axes[0], 0)
            p = ph * U + u  # vector within the chunk
            k = g * span + c * CHUNK + p * lanes() + lane
            per_half = (CHUNK // 2) // lanes()  # vectors of a chunk's low (or high) nibbles
            byte = (g * (span // CHUNK) + c) * (CHUNK // 2) + tirx.floormod(p, per_half) * lanes() + lane
            return k, byte, tirx.floordiv(p, per_half)
        (v,) = axes
        k = g * span + (v * U + u) * lanes() + lane
        return k, k, None

    def column(b, r, t):
        """The output column of tile t, row r of block b."""
        return b * nb + r * slot + t

    def row_of(h, b, r, t):
        return h * half + tirx.min(column(b, r, t), half - 1)

    def product(m, h, b, r, t, g, u, lane, axes):
        k, at, high = position(g, u, lane, axes)
        xm, row = _clamp_row(m, M, mr), row_of(h, b, r, t)
        if ragged and spec.four_bit:
            # a vector lies in one chunk: wholly in the row or wholly past it (the last group
            # of fewer chunks), where x_codes is 0 and the row's last vector will do. Clamping
            # the vector, not the byte, keeps the load contiguous (a clamped byte is a gather).
            at = tirx.min(at - lane, row_bytes - lanes()) + lane
        elif ragged:  # x_codes is 0 there; any byte of the row will do
            at = tirx.min(at, row_bytes - 1)
        if w8a8:
            return as_expr(ops.parts["q"][row, at]).astype("int32") * as_expr(ops.x_codes[xm, k]).astype("int32")
        code = _nibble_code(ops, spec, row, at, high, lane) if spec.four_bit else ops.code(row, at)
        value = code * ops.x_codes[xm, k]
        if not factored:
            value = value * ops.scale(row, tirx.min(tirx.floordiv(k, spec.group_size), spec.G - 1))
        return value

    tiles = (rows, H, blocks, nr, slot)  # rows of x, halves, then the output column
    part = te.compute((*tiles, G, U, lanes()),
                      lambda m, h, b, r, t, g, u, lane: te.sum(product(m, h, b, r, t, g, u, lane, reduce), axis=reduce),
                      name="part")
    xsum = None
    if spec.format == "int4":
        xs_reduce = [te.reduce_axis(a.dom, name=a.var.name + "_x") for a in reduce]

        def x_at(m, g, u, lane):
            return ops.x_codes[m, position(g, u, lane, xs_reduce)[0]]

        xsum = te.compute((M, G, U, lanes()), lambda m, g, u, lane: te.sum(x_at(m, g, u, lane), axis=xs_reduce),
                          name="xsum")
    # The tile's scales (and offsets) in f32, converted once per tile, not per use.
    converted = {}
    if factored and not w8a8:
        for name in ("scale", "offset") if xsum is not None else ("scale",):
            converted[name] = _tile_f32(ops.parts[name], row_of, (H, blocks, nr, slot, G), spec.scale_dtype)
    g_ax = te.reduce_axis((0, G), name="g")
    # acc += part * scale, then acc += xsum * offset: two FMAs (a term axis, unrolled)
    term = te.reduce_axis((0, 2 if xsum is not None else 1), name="term")

    def combined(m, h, b, r, t, u, lane):
        value = part[m, h, b, r, t, g_ax, u, lane]
        if w8a8 or not factored:
            return value
        scaled = value * converted["scale"](h, b, r, t, g_ax)
        if xsum is None:
            return scaled
        shifted = xsum[_clamp_row(m, M, mr), g_ax, u, lane] * converted["offset"](h, b, r, t, g_ax)
        return tirx.Select(term.var == 0, scaled, shifted)

    acc = te.compute((*tiles, U, lanes()), lambda m, h, b, r, t, u, lane: te.sum(combined(m, h, b, r, t, u, lane),
                                                                                axis=[g_ax, term]), name="acc")
    u_ax, lane_ax = te.reduce_axis((0, U), name="u"), te.reduce_axis((0, lanes()), name="lane")
    total = te.compute(tiles, lambda m, h, b, r, t: te.sum(acc[m, h, b, r, t, u_ax, lane_ax], axis=[u_ax, lane_ax]),
                       name="total")

    def pre_epilogue(m, h, j):
        value = as_expr(total[m, h, j // nb, j % nb // slot, j % slot])
        if w8a8:
            value = value.astype("float32") * ops.scale_x[m] * ops.scale(h * half + j, 0)
        if ops.outlier is not None:
            value = value + ops.outlier[m, h * half + j]
        return value

    out = te.compute((M, half), lambda m, j: epilogue(g_spec, lambda h: pre_epilogue(m, h, j), ops.extras, m, j),
                     name="out")
    sch = s_tir.Schedule(te.create_prim_func([*ops.args, out]))
    b_out, b_total, b_acc, b_part = (sch.get_sblock(n) for n in ("out", "total", "acc", "part"))
    m, j = sch.get_loops(b_out)
    j_block, j_rest = sch.split(j, [None, nb])
    m_tile, m_row = sch.split(m, [None, mr])
    sch.reorder(j_block, m_tile, m_row, j_rest)
    if ops.outlier is not None:
        sch.compute_at(sch.get_sblock("outlier"), j_block, preserve_unit_loops=True)
    # Per block and tile of rows of x, the totals first (tile by tile), then the outputs:
    # `out` reads them at columns b * nb + r * slot + t, not one interval per tile.
    sch.compute_at(b_total, m_tile, preserve_unit_loops=True)
    t_mi, t_h, _, t_r, t_t, t_u, t_lane = sch.get_loops(b_total)[-7:]
    sch.reorder(t_t, t_mi, t_h, t_r, t_u, t_lane)
    sch.compute_at(b_acc, t_t, preserve_unit_loops=True)
    a_m, a_h, a_b, a_r, a_t, a_u, a_lane, a_g, a_term = sch.get_loops(b_acc)[-9:]
    sch.reorder(a_g, a_term, a_m, a_h, a_b, a_r, a_t, a_u, a_lane)
    sch.compute_at(b_part, a_g, preserve_unit_loops=True)
    for name in converted:
        if spec.scale_dtype != "float32":
            b_convert = sch.get_sblock(f"{name}_f32")
            sch.compute_at(b_convert, t_t, preserve_unit_loops=True)
            sch.vectorize(sch.get_loops(b_convert)[-1])
    loops = sch.get_loops(b_part)
    p_m, p_h, p_b, p_r, p_t, _, p_u, p_lane = loops[-8 - len(reduce):-len(reduce)]
    p_reduce = loops[-len(reduce):]
    sch.reorder(*p_reduce, p_m, p_h, p_b, p_r, p_t, p_u, p_lane)
    sch.vectorize(p_lane)
    sch.vectorize(a_lane)
    tile_loops = (p_m, p_h, p_b, p_r, p_t, p_u, a_term, a_m, a_h, a_b, a_r, a_t, a_u, t_mi, t_h, t_r, t_u, t_lane)
    for loop in (*tile_loops, *p_reduce[1:]):
        sch.unroll(loop)
    sch.parallel(j_block)
    # Prefetch: each tile row streams its run of q's rows; it asks for the row about
    # PREFETCH_BYTES ahead in its run, at the column it reads, once a group or 64 bytes.
    row_bytes = packed_columns(K) if spec.four_bit else K
    first = p_reduce[0]
    if G > 1:
        at, step = a_g, span // 2 if spec.four_bit else span
    else:
        step = CHUNK // 2 if spec.four_bit else U * lanes()  # bytes of a row per reduce iteration
        extent = -(-span // (CHUNK if spec.four_bit else U * lanes()))
        split = max(f for f in range(1, max(1, 64 // step) + 1) if extent % f == 0)
        at = first = sch.split(first, [None, split])[0] if split > 1 else first
        step *= split
    sch.decompose_reduction(b_part, first)
    sch.decompose_reduction(b_acc, a_g)
    if xsum is not None:
        loops = sch.get_loops(sch.get_sblock("xsum"))
        sch.reorder(*loops[4:], loops[2], loops[3])
        sch.vectorize(loops[3])
    b_var, t_var, at_var = (sch.get(loop).loop_var for loop in (j_block, t_t, at))
    ahead = t_var + max(1, -(-PREFETCH_BYTES // row_bytes))
    calls = []
    for h in range(H):
        for r in range(nr):
            row = h * half + tirx.min(column(b_var + ahead // slot, r, ahead % slot), half - 1)
            calls.append((row, tirx.min(at_var * step, row_bytes - 1)))
    return _with_prefetch(sch.mod["main"], at_var, "q", calls) if PREFETCH_BYTES else sch.mod["main"]


def _with_prefetch(func: tirx.PrimFunc, loop_var, buffer_name: str, places: list) -> tirx.PrimFunc:
    """`func` with a prefetch of buffer[row, column] for each (row, column) in `places`
    at the start of the body of the loop over `loop_var` (indices may use outer loops)."""
    found = []

    def find(load):
        if load.source.name == buffer_name:
            found.append(load.source)

    tvm_ffi.structural_walk(func.body, (tvm.ir.TensorLoad, find))
    prefetches = [tirx.Evaluate(tirx.call_llvm_intrin("void", "llvm.prefetch", tirx.address_of(
        tirx.BufferLoad(found[0], [row, column])), 0, PREFETCH_LOCALITY, 1)) for row, column in places]

    def visit(loop):
        if not loop.loop_var.same_as(loop_var):
            return loop
        return tirx.For(loop.loop_var, loop.min, loop.extent, loop.kind, tirx.SeqStmt([*prefetches, loop.body]),
                        loop.thread_binding, loop.annotations)

    return tvm_ffi.structural_map(func, (tirx.For, visit))


def _slot(half: int, nr: int) -> int:
    """Rows of q per tile row and parallel block: long runs for the prefetchers (SLOT), but
    blocks that split evenly over the threads (or are many), else SLOT / 2."""
    cores = max(1, int(target().attrs.get("num-cores", 1)))
    blocks = -(-half // (SLOT * nr))
    return SLOT if blocks % cores == 0 or blocks >= 8 * cores else SLOT // 2


def _tile_f32(part, row_of, shape, dtype):
    """part[row, g] in f32 as a function of (h, b, r, t, g): read as it is when f32, else
    from a stage converting the tile's values at once (scheduled per tile)."""
    if dtype == "float32":
        return lambda h, b, r, t, g: part[row_of(h, b, r, t), g]
    name = f"{part.op.name}_f32"
    stage = te.compute(shape, lambda h, b, r, t, g: as_expr(part[row_of(h, b, r, t), g]).astype("float32"), name=name)
    return lambda h, b, r, t, g: stage[h, b, r, t, g]


def _nibble_code(ops, spec, row, byte, high, lane):
    """The code of a 4-bit element: its nibble (int4) or NF4 level (nf4), as f32. The byte
    is widened first (one zero-extending load), then shifted or masked."""
    value = as_expr(ops.parts["q"][row, byte]).astype("int32")
    permute = _level_permute()
    if spec.format == "int4" or permute is None:
        nibble = tirx.Select(high > 0, value >> 4, value & 15)
        return nibble.astype("float32") if spec.format == "int4" else _nf4_level(nibble)
    # NF4_LEVELS[nibble] in the loop TVM vectorizes over `lane`: register permutes of the
    # table (vector constants level[lane], ...) by the nibble. A permute reads its index's
    # low bits only (4 of 16 lanes, 3 of 8), so the widened byte (or it shifted by 4) serves.
    index = tirx.Select(high > 0, value >> 4, value)
    if lanes() == 16:  # AVX-512: the whole table in one register, one vpermps
        return tirx.call_llvm_pure_intrin("float32", permute, _nf4_level(lane), index)
    # AVX2: two vpermps of the table's halves, then a blend on the nibble's bit 3 moved to
    # the sign bit
    sign = tirx.Select(high > 0, value << 24, value << 28)
    low, upper = (tirx.call_llvm_pure_intrin("float32", permute, _nf4_level(lane + half), index) for half in (0, 8))
    return tirx.call_llvm_pure_intrin("float32", "llvm.x86.avx.blendv.ps.256", low, upper,
                                      tirx.reinterpret("float32", sign))


@functools.cache
def lanes() -> int:
    """fp32 lanes of the quantized kernels' vectors: 16 where the CPU has AVX-512, else 8.
    The int4 GEMV is bound by its instructions per weight (widen, mask, convert, FMA), not
    by memory, and 16 lanes halve them: SmolLM2's Q4_1 decode ran ~1.15x faster."""
    with target():
        return 16 if tvm.target.codegen.target_has_features("avx512f", target()) else 8


def _level_permute():
    """The LLVM intrinsic permuting a vector of `lanes()` floats by index, or None."""
    with target():
        if lanes() == 16:
            return "llvm.x86.avx512.permvar.sf.512"
        return "llvm.x86.avx2.permps" if tvm.target.codegen.target_has_features("avx2", target()) else None


# ----------------------------------------------------------------------------- the tiled form: prefill
def gemm_func(spec: QSpec, mr: int, panels: int, block_tiles: int) -> tirx.PrimFunc:
    """BLIS micro-kernel over panels each parallel block unpacks; see the module docstring."""
    g_spec, K = spec.gemm, spec.K
    H, half = g_spec.halves, g_spec.n_out
    c = PANEL // H  # columns of one half in a panel
    nb = panels * c
    M = tirx.Var("M", "int32")
    ops = _Operands(spec, M)
    padded = _round_up(half, nb * block_tiles)
    w8a8 = spec.activations == "int8"
    by_chunks = spec.four_bit and K % CHUNK == 0

    def unpacked(p, k, col):
        row = col // c * half + tirx.min(p * c + col % c, half - 1)
        return as_expr(ops.parts["q"][row, k]).astype("int32") if w8a8 else ops.weight(row, k, by_chunks)

    w_panels = te.compute((padded // c, K, PANEL), unpacked, name="w_panels")
    last = w_panels.shape[0] - 1
    rows = M if mr == 1 else tirx.floordiv(M + mr - 1, mr) * mr
    k_ax = te.reduce_axis((0, K), name="k")

    def product(m, h, j):
        xm = _clamp_row(m, M, mr)
        w = w_panels[tirx.min(j // c, last), k_ax, h * c + j % c]
        return as_expr(ops.x_codes[xm, k_ax]).astype("int32") * w if w8a8 else ops.x_codes[xm, k_ax] * w

    acc = te.compute((rows, H, padded), lambda m, h, j: te.sum(product(m, h, j), axis=k_ax), name="acc")

    def pre_epilogue(m, h, j):
        value = as_expr(acc[m, h, j])
        if w8a8:
            value = value.astype("float32") * ops.scale_x[m] * ops.scale(h * half + j, 0)
        if ops.outlier is not None:
            value = value + ops.outlier[m, h * half + j]
        return value

    out = te.compute((M, half), lambda m, j: epilogue(g_spec, lambda h: pre_epilogue(m, h, j), ops.extras, m, j),
                     name="out")
    sch = s_tir.Schedule(te.create_prim_func([*ops.args, out]))
    b_out, b_acc, b_pack = sch.get_sblock("out"), sch.get_sblock("acc"), sch.get_sblock("w_panels")
    m, j = sch.get_loops(b_out)
    j_block, j_tile, j_panel, j_col = sch.split(j, [None, block_tiles, panels, c])
    m_tile, m_row = sch.split(m, [None, mr])
    sch.reorder(j_block, m_tile, j_tile, m_row, j_panel, j_col)
    if ops.outlier is not None:
        sch.compute_at(sch.get_sblock("outlier"), j_block, preserve_unit_loops=True)
    sch.compute_at(b_acc, j_tile, preserve_unit_loops=True)
    sch.compute_at(b_pack, j_block, preserve_unit_loops=True)
    if by_chunks:  # 4-bit: vectorized along k, chunk by chunk (stores 16 floats apart)
        pk_p, pk_k, pk_c = sch.get_loops(b_pack)[-3:]
        sch.reorder(pk_p, pk_c, pk_k)
        _, pk_high, pk_half, pk_lane = sch.split(pk_k, [None, 2, (CHUNK // 2) // lanes(), lanes()])
        sch.unroll(pk_high)
        sch.unroll(pk_half)
        sch.vectorize(pk_lane)
    a_m, a_h, a_j, a_k = sch.get_loops(b_acc)[-4:]
    a_p, a_c = sch.split(a_j, [panels, c])
    sch.reorder(a_k, a_m, a_p, a_h, a_c)
    sch.vectorize(a_c)
    for loop in (a_m, a_p, a_h, m_row, j_panel):
        sch.unroll(loop)
    if half % c == 0:
        sch.vectorize(j_col)
    sch.parallel(j_block)
    sch.decompose_reduction(b_acc, a_k)
    _parallel_rows(sch, ops)
    return sch.mod["main"]


def _parallel_rows(sch, ops: _Operands) -> None:
    """The x prologue stages of the tiled form: parallel over rows."""
    for name in ops.stages:
        if name in ("x_codes", "amax", "row_scale"):
            sch.parallel(sch.get_loops(sch.get_sblock(name))[0])


# ----------------------------------------------------------------------------- kernel
def generate(group: Graph) -> tuple:
    """(kernel name, {function name: scheduled PrimFunc})."""
    spec = spec_of(single_node(group))
    funcs = {form: gemv_func(spec, mr, nr // spec.gemm.halves if form == "gemv" else nr)
             for form, (mr, nr) in GEMV_TILES.items()}
    funcs["gemm"] = gemm_func(spec, *PANEL_TILES["gemm"])
    return spec.name, funcs


def make_run(group: Graph, functions):
    """run(*group inputs): flatten x's leading dims, allocate the output, pick the form
    by rows (1 -> gemv1, 2 -> gemv2, up to GEMV_MAX_ROWS -> gemv, above -> gemm)."""
    node = single_node(group)
    spec, positions = spec_of(node), operand_positions(group, node)
    n_parts = len(spec.parts)
    return rows_run(functions, spec.K, spec.gemm.n_out, _extra_widths(spec.gemm), positions[0],
                    positions[1:1 + n_parts], positions[1 + n_parts:], QGEMV_FORMS)


def program_call(group: Graph, forms: dict, operands: list, ctx):
    """`make_run` in the cpu program (program.py): rows flattened, the form chosen by rows."""
    node = single_node(group)
    spec, positions = spec_of(node), operand_positions(group, node)
    n_parts = len(spec.parts)
    x_type = node.inputs[0].type
    lead = ctx.shape(x_type)[:-1]
    rows = ctx.product(lead)
    x = ctx.reshape(operands[positions[0]], [rows, spec.K])
    extras = []
    for at, width in zip(positions[1 + n_parts:], _extra_widths(spec.gemm)):
        value, extra_type = operands[at], group.inputs[at].type
        if extra_type.rank > 1:
            if list(extra_type.shape[:-1]) != list(x_type.shape[:-1]):
                value = ctx.broadcast(value, [*lead, width])
            value = ctx.reshape(value, [rows, width])
        extras.append(value)
    parts = [operands[at] for at in positions[1:1 + n_parts]]
    args, out = [x, *parts, *extras], [rows, spec.gemm.n_out]

    def form(name):
        return lambda: ctx.call(forms[name], args, out, "float32")

    return ctx.reshape(choose_by_rows(ctx, rows, form, QGEMV_FORMS), [*lead, spec.gemm.n_out])
