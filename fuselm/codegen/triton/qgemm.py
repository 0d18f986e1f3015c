"""qgemm: gemm over a quantized weight (ir/quant_ops.py), with gemm's generated epilogue.

The weight stays in its parts (q, scale[, offset]) in memory; each program dequantizes
the [BLOCK_K, BLOCK_N] tiles it multiplies, in registers, so the float weight is never
materialized. The K loop per format:

  int8      q[n, k] * scale[n, k // GROUP_SIZE], one tile product per K tile
  int4/nf4  the K tile is BLOCK_K / 32 chunks of 16 bytes (the chunk layout of
            quant_ops.py): the low nibbles are the chunks' first 16 elements, the high
            ones the last 16, so one byte load gives two [BLOCK_K/2, BLOCK_N] tiles,
            multiplied by the x columns they stand for (no interleaving). int4 is
            nibble * scale + offset, nf4 NF4_LEVELS[nibble] * scale (a chain of selects)

Each dequantized tile is cast to x's dtype before the product, as the reference casts the
dequantized weight, and the product accumulates in fp32. A scale (offset) per group is
read once per column when a K tile lies in one group, else gathered per element.

activations="int8" (W8A8, an int8 weight with a scale per output channel): a first
kernel quantizes each row of x (times `smooth`, when present) to int8 with its absmax
scale, as quantize_dynamic does (symmetric, ties to even); the gemm kernel multiplies
int8 by int8 into int32 tiles and scales the result by x_scale[row] * scale[col]. With
LLM.int8's outlier features (`keep`, `w_keep`) those features are left out of x's int8
part (code 0, not in the row's absmax, and zeroed in a float x) and added in floating
point: x[:, keep] @ w_keep^T, a second loop in the gemm kernel. Then the epilogue
(gemm.py's `Epilogue`: bias, activations, gated_silu with two accumulators, residual).

Tiles are picked by M as gemm.py does: GEMV-like ones (BLOCK_M=1, multiply-and-sum) for
decode, tensor-core tiles above; on a GPU the fastest candidate is measured (tuning.py).
"""
from __future__ import annotations

from ...errors import UnsupportedKernelError
from ...ir.core_ops import ACTIVATIONS as IR_ACTIVATIONS
from ...ir.graph import Node
from ...ir.quant_ops import NF4_LEVELS, qgemm_parts
from .device_functions import ACTIVATIONS, mma_source
from .gemm import _CONFIGS as GEMM_CONFIGS
from .gemm import TILE_ORDER, TILE_PRODUCT, Epilogue, _paren
from .module import OMIT, GeneratedKernel, drop_omitted, optional, torch_dtype_name

OPS = ("qgemm",)

OUTLIER_BLOCK = 16  # outlier features per step of the LLM.int8 loop (tl.dot takes K >= 16)

# (largest M, candidate tiles), as in gemm.py. BLOCK_K is a multiple of 32 (a 4-bit tile is
# whole chunks and each nibble half is at least 16 deep for tl.dot), and of 64 for int8 dots.
_SMALL = dict(BLOCK_M=16, GROUP_M=1, DOT=True)
_GEMV = dict(GROUP_M=1, DOT=False)
_CONFIGS = {
    "half": [
        (16, [dict(_SMALL, BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=4),
              dict(_GEMV, BLOCK_M=1, BLOCK_N=8, BLOCK_K=256, num_warps=4, num_stages=4),
              dict(_GEMV, BLOCK_M=1, BLOCK_N=4, BLOCK_K=512, num_warps=4, num_stages=3),
              dict(_SMALL, BLOCK_N=16, BLOCK_K=256, num_warps=4, num_stages=4),
              dict(_GEMV, BLOCK_M=4, BLOCK_N=8, BLOCK_K=256, num_warps=4, num_stages=4)]),
        (64, [dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4, DOT=True),
              dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=3, DOT=True)]),
        (None, [dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3, DOT=True)]),
    ],
    "gated_half": [  # two accumulators per program: half the columns
        (16, [dict(_SMALL, BLOCK_N=16, BLOCK_K=128, num_warps=4, num_stages=4),
              dict(_GEMV, BLOCK_M=1, BLOCK_N=8, BLOCK_K=256, num_warps=4, num_stages=3),
              dict(_GEMV, BLOCK_M=1, BLOCK_N=4, BLOCK_K=512, num_warps=4, num_stages=3),
              dict(_SMALL, BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=3)]),
        (64, [dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3, DOT=True),
              dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4, DOT=True)]),
        (None, [dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3, DOT=True)]),
    ],
    "f32": GEMM_CONFIGS["f32"],  # fp32 x: gemm's own tiles
    "int8": [  # W8A8: int8 x int8 tensor-core dots (K 32 per instruction)
        (16, [dict(_SMALL, BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=4),
              dict(_GEMV, BLOCK_M=1, BLOCK_N=8, BLOCK_K=512, num_warps=4, num_stages=4),
              dict(_SMALL, BLOCK_N=16, BLOCK_K=256, num_warps=4, num_stages=4)]),
        (64, [dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4, DOT=True),
              dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4, DOT=True)]),
        (None, [dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3, DOT=True)]),
    ],
}

# ----------------------------------------------------------------------------- device helpers
X_TILE = '''@triton.jit
def x_tile(x_ptr, rows, m_mask, ks, k_mask, stride_xm, stride_xk):
    """x[rows, ks] as a [BLOCK_M, len(ks)] tile, zero outside [M, K]."""
    return tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                   mask=m_mask[:, None] & k_mask[None, :], other=0.0)
'''

GROUP_VALUES = '''@triton.jit
def group_values(ptr, cols, n_mask, ks, k_mask, k0, stride_n, stride_g,
                 GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr):
    """ptr[n, k // GROUP_SIZE] in fp32 (a scale or offset per group of GROUP_SIZE weights of a
    row) for rows n = cols and columns k = ks of the K tile starting at k0: one [1, BLOCK_N]
    row when the tile lies in one group, else a [len(ks), BLOCK_N] gather."""
    row = ptr + cols.to(tl.int64) * stride_n
    if GROUP_SIZE % BLOCK_K == 0:
        values = tl.load(row + (k0 // GROUP_SIZE) * stride_g, mask=n_mask, other=0.0)[None, :]
    else:
        values = tl.load(row[None, :] + (ks // GROUP_SIZE)[:, None] * stride_g,
                         mask=k_mask[:, None] & n_mask[None, :], other=0.0)
    return values.to(tl.float32)
'''

INT8_WEIGHT = '''@triton.jit
def int8_weight(q_ptr, scale_ptr, cols, n_mask, ks, k_mask, k0, stride_qn, stride_qk, stride_sn, stride_sg,
                GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr):
    """The fp32 weight tile w[k, n] = q[n, k] * scale[n, k // GROUP_SIZE], k in ks, n in cols."""
    q = tl.load(q_ptr + cols[None, :].to(tl.int64) * stride_qn + ks[:, None] * stride_qk,
                mask=k_mask[:, None] & n_mask[None, :], other=0)
    scale = group_values(scale_ptr, cols, n_mask, ks, k_mask, k0, stride_sn, stride_sg, GROUP_SIZE, BLOCK_K)
    return q.to(tl.float32) * scale
'''

NIBBLES = '''@triton.jit
def nibbles(q_ptr, cols, n_mask, byte_k, k_mask, stride_qn, stride_qk):
    """The 4-bit codes in bytes byte_k of weight rows cols: (low nibbles, high nibbles),
    int32 [len(byte_k), BLOCK_N] tiles."""
    packed = tl.load(q_ptr + cols[None, :].to(tl.int64) * stride_qn + byte_k[:, None] * stride_qk,
                     mask=k_mask[:, None] & n_mask[None, :], other=0).to(tl.int32)
    return packed & 15, packed >> 4
'''

INT4_WEIGHT = '''@triton.jit
def int4_weight(q_ptr, scale_ptr, offset_ptr, cols, n_mask, byte_k, lo_k, k_mask, k0,
                stride_qn, stride_qk, stride_sn, stride_sg, stride_on, stride_og,
                GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr):
    """The fp32 weights nibble * scale + offset held in bytes byte_k of rows cols: the tile of
    the low nibbles (elements lo_k) and the tile of the high nibbles (elements lo_k + 16)."""
    low, high = nibbles(q_ptr, cols, n_mask, byte_k, k_mask, stride_qn, stride_qk)
    scale = group_values(scale_ptr, cols, n_mask, lo_k, k_mask, k0, stride_sn, stride_sg, GROUP_SIZE, BLOCK_K)
    offset = group_values(offset_ptr, cols, n_mask, lo_k, k_mask, k0, stride_on, stride_og, GROUP_SIZE, BLOCK_K)
    return low.to(tl.float32) * scale + offset, high.to(tl.float32) * scale + offset
'''

NF4_WEIGHT = '''@triton.jit
def nf4_weight(q_ptr, scale_ptr, cols, n_mask, byte_k, lo_k, k_mask, k0,
               stride_qn, stride_qk, stride_sn, stride_sg, GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr):
    """The fp32 weights NF4[nibble] * scale held in bytes byte_k of rows cols: the tile of
    the low nibbles (elements lo_k) and the tile of the high nibbles (elements lo_k + 16)."""
    low, high = nibbles(q_ptr, cols, n_mask, byte_k, k_mask, stride_qn, stride_qk)
    scale = group_values(scale_ptr, cols, n_mask, lo_k, k_mask, k0, stride_sn, stride_sg, GROUP_SIZE, BLOCK_K)
    return nf4_level(low) * scale, nf4_level(high) * scale
'''


def _nf4_level_source() -> str:
    """`nf4_level(code)`: the table lookup NF4_LEVELS[code], written out as selects."""
    zero = NF4_LEVELS.index(0.0)
    lines = [f"    level = tl.where(code == {i}, {v!r}, level)" for i, v in enumerate(NF4_LEVELS) if i != zero]
    return "\n".join([
        "@triton.jit",
        "def nf4_level(code):",
        f'    """QLoRA\'s NormalFloat-4 level of each code 0..15 (fp32; code {zero} is 0.0)."""',
        "    level = tl.zeros(code.shape, dtype=tl.float32)",
        *lines,
        "    return level",
        "",
    ])


SMOOTHED = '''@triton.jit
def smoothed(x, smooth):
    """x * smooth in x's dtype (SmoothQuant's per-feature factor, cast to x's dtype and the
    product rounded to it as the reference does; exact in fp32 before that rounding)."""
    return (x.to(tl.float32) * smooth.to(x.dtype).to(tl.float32)).to(x.dtype)
'''

ROUND_HALF_EVEN = '''@triton.jit
def round_half_even(v):
    """torch.round: to the nearest integer, ties to the even one (|v| well under 2**22)."""
    r = tl.floor(v + 0.5)
    odd = r - 2.0 * tl.floor(r * 0.5) != 0.0
    return tl.where((r - v == 0.5) & odd, r - 1.0, r)
'''

INT8_TILE_PRODUCT = '''@triton.jit
def int8_tile_product(a, b, acc, DOT: tl.constexpr):
    """acc + a @ b for int8 tiles, exact in int32: on the tensor cores (DOT), or as a broadcast
    multiply and sum over K for the GEMV tiles of decode."""
    if DOT:
        acc = tl.dot(a, b, acc)
    else:
        acc += tl.sum(a.to(tl.int32)[:, :, None] * b.to(tl.int32)[None, :, :], axis=1)
    return acc
'''


class _Form:
    """What one qgemm node needs: format, activations, optional parts, epilogue, dtypes."""

    def __init__(self, node: Node):
        attrs = node.attrs
        x, parts, _ = qgemm_parts(tuple(v.type for v in node.inputs), attrs)
        self.format, self.group_size = attrs["format"], attrs["group_size"]
        self.n, self.k = attrs["n"], attrs["k"]
        self.activations = attrs.get("activations", "float")
        self.parts = tuple(attrs.get("parts", ()))
        self.steps = tuple(attrs.get("epilogue", ()))
        self.dtype, self.scale_dtype = x.dtype, parts["scale"].dtype
        self.smooth, self.keep = "smooth" in parts, "keep" in parts
        self.int8 = self.activations == "int8"
        self.four_bit = self.format in ("int4", "nf4")
        if self.dtype not in ("f32", "f16", "bf16"):
            raise UnsupportedKernelError(f"qgemm kernels take float x (f32, f16, bf16), got {x}")
        if self.steps.count("gated_silu") > 1:
            raise UnsupportedKernelError("qgemm: more than one gated_silu step")
        if self.int8 and self.format != "int8":
            raise UnsupportedKernelError(
                f"qgemm: int8 activations (W8A8) multiply an int8 weight, not a {self.format} one")
        if self.int8 and self.group_size < self.k:
            raise UnsupportedKernelError(
                f"qgemm: int8 activations take an int8 weight with one scale per output channel "
                f"(group_size >= k = {self.k}), got group_size {self.group_size}")
        self.epilogue = Epilogue(self.steps)
        if self.epilogue.gated and self.n % 2:
            raise UnsupportedKernelError(f"qgemm: gated_silu over an odd number of weight rows ({self.n})")
        self.out_n = self.n // 2 if self.epilogue.gated else self.n

    @property
    def name(self) -> str:
        words = ["qgemm", self.format, f"g{self.group_size}", f"k{self.k}", f"n{self.out_n}"]
        words += ["a8"] if self.int8 else []
        words += ["smooth"] if self.smooth else []
        words += ["keep"] if self.keep else []
        return "_".join([*words, *self.steps, self.dtype, f"s{self.scale_dtype}"])

    @property
    def configs(self) -> list:
        if self.int8:
            return _CONFIGS["int8"]
        return _CONFIGS["f32" if self.dtype == "f32" else ("gated_half" if self.epilogue.gated else "half")]

    @property
    def halves(self) -> list:
        """(accumulator, weight rows) of each half of the weight the program multiplies."""
        return [("acc", "offs_n"), ("acc_up", "offs_n + N")] if self.epilogue.gated else [("acc", "offs_n")]

    def tensors(self) -> list:
        """The tensors the gemm kernel reads, by their names in the host code (pointer: name_ptr)."""
        names = ["x"] if not self.int8 or self.keep else []
        names += ["xq", "x_scale"] if self.int8 else []
        names += ["q", "scale"] + (["offset"] if self.format == "int4" else [])
        names += ["smooth"] if self.smooth and self.keep else []  # outlier features are smoothed too
        names += ["outlier"] if self.keep and not self.int8 else []
        names += ["keep", "w_keep"] if self.keep else []
        return names + ["out2d", *self.epilogue.params]

    def strides(self) -> list:
        """(kernel parameters, host expressions) of the strides, in order."""
        out = [(["stride_xm", "stride_xk"], ["x.stride(0)", "x.stride(1)"])] if "x" in self.tensors() else []
        out.append((["stride_qn", "stride_qk"], ["q.stride(0)", "q.stride(1)"]))
        out.append((["stride_sn", "stride_sg"], ["scale.stride(0)", "scale.stride(1)"]))
        if self.format == "int4":
            out.append((["stride_offset_n", "stride_offset_g"], ["offset.stride(0)", "offset.stride(1)"]))
        if self.keep:
            out.append((["stride_wkeep_n", "stride_wkeep_o"], ["w_keep.stride(0)", "w_keep.stride(1)"]))
        out.append((["stride_om", "stride_on"], ["out2d.stride(0)", "out2d.stride(1)"]))
        for p in self.epilogue.params:
            host = [f"{p}.stride(0)"] if p.startswith("bias") else [f"{p}.stride(0)", f"{p}.stride(1)"]
            kernel = [f"stride_{p}"] if p.startswith("bias") else [f"stride_{p}_m", f"stride_{p}_n"]
            out.append((kernel, host))
        return out


def generate(node: Node) -> GeneratedKernel:
    form = _Form(node)
    name = form.name
    helpers = [mma_source(form.dtype), TILE_PRODUCT] + ([X_TILE] if "x" in form.tensors() else [])
    if form.int8:
        helpers += [INT8_TILE_PRODUCT, ROUND_HALF_EVEN]
    else:
        helpers += [GROUP_VALUES]
        helpers += {"int8": [INT8_WEIGHT], "int4": [NIBBLES, INT4_WEIGHT],
                    "nf4": [NIBBLES, _nf4_level_source(), NF4_WEIGHT]}[form.format]
    if form.smooth:
        helpers.append(SMOOTHED)
    helpers += [ACTIVATIONS[a] for a in IR_ACTIVATIONS if a in form.steps or (a == "silu" and form.epilogue.gated)]
    kernels = ([_quantize_kernel(name, form)] if form.int8 else []) + [_kernel(name, form)]
    body = drop_omitted("\n\n".join(
        ["from fuselm.codegen.triton.tuning import fastest_config, power_of_two_bucket", *helpers, *kernels,
         _launch(name, form, torch_dtype_name(form.dtype))]
    ))
    weight = f"{form.format} weight (group {form.group_size}, {form.scale_dtype} scales)"
    acts = "int8 activations" + (" smoothed" if form.smooth else "") if form.int8 else "float activations"
    summary = (f"x[M, K] @ w[N, K]^T, w the {weight} dequantized in registers, {acts}"
               f"{', outlier features in float' if form.keep else ''}, epilogue [{', '.join(form.steps)}], "
               f"K={form.k}, N={form.out_n}, {form.dtype}")
    return GeneratedKernel(name, summary, body, ("x", *form.parts, *form.epilogue.params))


# ----------------------------------------------------------------------------- kernels
def _indent(lines: list, depth: int) -> str:
    return "\n".join(" " * depth + line if line != OMIT else OMIT for line in lines)


def _quantize_kernel(name: str, form: _Form) -> str:
    """W8A8's first kernel: x's rows to int8 codes and a scale per row."""
    load = ["x = tl.load(x_ptr + row * stride_xm + ks * stride_xk, mask=k_mask, other=0.0)",
            optional(form.smooth, "x = smoothed(x, tl.load(smooth_ptr + ks, mask=k_mask, other=0.0))"),
            "x = x.to(tl.float32)",
            optional(form.keep, "x = tl.where(tl.load(outlier_ptr + ks, mask=k_mask, other=0) != 0, 0.0, x)"
                                "  # an outlier feature: code 0")]
    pointers = "x_ptr" + (", smooth_ptr" if form.smooth else "") + (", outlier_ptr" if form.keep else "")
    what = "x * smooth" if form.smooth else "x"
    outliers = "\n    The outlier features are code 0 and do not count toward the absmax." if form.keep else ""
    return f'''@triton.jit
def {name}_quantize_kernel(
    {pointers}, xq_ptr, x_scale_ptr,
    K, stride_xm, stride_xk,
    BLOCK_K: tl.constexpr,
):
    """Row m (program m) of {what} -> int8 codes xq[m, :] = round(x / x_scale[m]) and its
    scale x_scale[m] = absmax / 127: quantize_dynamic (symmetric, ties to even).{outliers}"""
    row = tl.program_id(axis=0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    absmax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        k_mask = ks < K
{_indent(load, 8)}
        absmax = tl.maximum(absmax, tl.abs(x))
    x_scale = tl.math.div_rn(tl.maximum(tl.max(absmax, axis=0), 1e-12), 127.0)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        k_mask = ks < K
{_indent(load, 8)}
        code = round_half_even(tl.math.div_rn(x, x_scale))
        code = tl.minimum(tl.maximum(code, -127.0), 127.0)
        tl.store(xq_ptr + row * K + ks, code.to(tl.int8), mask=k_mask)
    tl.store(x_scale_ptr + row, x_scale)
'''


def _float_loop(form: _Form) -> list:
    """The K loop of float activations: x tiles times weight tiles dequantized in registers."""
    drop = "x{s} = tl.where(tl.load(outlier_ptr + {ks}, mask={ks} < K, other=0)[None, :] != 0, 0.0, x{s})"
    if form.format == "int8":
        lines = ["ks = k * BLOCK_K + offs_k",
                 "k_mask = ks < K",
                 "x = x_tile(x_ptr, rows, m_mask, ks, k_mask, stride_xm, stride_xk)",
                 optional(form.keep, drop.format(s="", ks="ks") + "  # outlier features: w_keep below")]
        for acc, cols in form.halves:
            w = f"w{acc[3:]}"
            lines += [f"{w} = int8_weight(q_ptr, scale_ptr, {cols}, n_mask, ks, k_mask, k * BLOCK_K, "
                      "stride_qn, stride_qk, stride_sn, stride_sg, GROUP_SIZE, BLOCK_K)",
                      f"{acc} = tile_product(x, {w}.to(x.dtype), {acc}, UPCAST, DOT)"]
        return lines
    lines = ["# the tile's bytes: BLOCK_K / 32 chunks of 16; byte j of a chunk holds its elements j, j + 16",
             "byte_k = k * (BLOCK_K // 2) + half",
             "lo_k = k * BLOCK_K + lo_offs",
             "k_mask = lo_k < K  # a byte exists where its low element does",
             "x_lo = x_tile(x_ptr, rows, m_mask, lo_k, k_mask, stride_xm, stride_xk)",
             "x_hi = x_tile(x_ptr, rows, m_mask, lo_k + 16, lo_k + 16 < K, stride_xm, stride_xk)",
             optional(form.keep, drop.format(s="_lo", ks="lo_k") + "  # outlier features: w_keep below"),
             optional(form.keep, drop.format(s="_hi", ks="(lo_k + 16)"))]
    for acc, cols in form.halves:
        w = f"w{acc[3:]}"
        if form.format == "int4":
            call = (f"int4_weight(q_ptr, scale_ptr, offset_ptr, {cols}, n_mask, byte_k, lo_k, k_mask, k * BLOCK_K, "
                    "stride_qn, stride_qk, stride_sn, stride_sg, stride_offset_n, stride_offset_g, GROUP_SIZE, BLOCK_K)")
        else:
            call = (f"nf4_weight(q_ptr, scale_ptr, {cols}, n_mask, byte_k, lo_k, k_mask, k * BLOCK_K, "
                    "stride_qn, stride_qk, stride_sn, stride_sg, GROUP_SIZE, BLOCK_K)")
        lines += [f"{w}_lo, {w}_hi = {call}",
                  f"{acc} = tile_product(x_lo, {w}_lo.to(x_lo.dtype), {acc}, UPCAST, DOT)",
                  f"{acc} = tile_product(x_hi, {w}_hi.to(x_hi.dtype), {acc}, UPCAST, DOT)"]
    return lines


def _int8_loop(form: _Form) -> list:
    """The K loop of int8 activations: int8 codes of x times the int8 weight, into int32."""
    lines = ["ks = k * BLOCK_K + offs_k",
             "k_mask = ks < K",
             "xq = tl.load(xq_ptr + rows[:, None] * K + ks[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0)"]
    for acc, cols in form.halves:
        w = f"w{acc[3:]}"
        lines += [f"{w} = tl.load(q_ptr + {_paren(cols)}[None, :].to(tl.int64) * stride_qn + ks[:, None] * stride_qk, "
                  "mask=k_mask[:, None] & n_mask[None, :], other=0)",
                  f"{acc}_int = int8_tile_product(xq, {w}, {acc}_int, DOT)"]
    return lines


def _outlier_loop(form: _Form) -> list:
    """LLM.int8's outlier features in floating point: acc += x[:, keep] @ w_keep^T."""
    lines = ["# outlier features (LLM.int8): x[:, keep] @ w_keep^T in floating point",
             "for o in range(0, tl.cdiv(O, BLOCK_O)):",
             "    offs_o = o * BLOCK_O + tl.arange(0, BLOCK_O)",
             "    o_mask = offs_o < O",
             "    features = tl.load(keep_ptr + offs_o, mask=o_mask, other=0)",
             "    x = x_tile(x_ptr, rows, m_mask, features, o_mask, stride_xm, stride_xk)",
             optional(form.smooth, "    x = smoothed(x, tl.load(smooth_ptr + features, mask=o_mask, other=0.0)[None, :])")]
    for acc, cols in form.halves:
        w = f"w{acc[3:]}"
        lines += [f"    {w} = tl.load(w_keep_ptr + {_paren(cols)}[None, :].to(tl.int64) * stride_wkeep_n + offs_o[:, None] * "
                  "stride_wkeep_o, mask=o_mask[:, None] & n_mask[None, :], other=0.0)",
                  f"    {acc} = tile_product(x, {w}.to(x.dtype), {acc}, UPCAST, DOT)"]
    return lines


def _kernel(name: str, form: _Form) -> str:
    epilogue = form.epilogue
    pointers = ", ".join(("out_ptr" if t == "out2d" else f"{t}_ptr") for t in form.tensors())
    strides = ", ".join(p for kernel, _ in form.strides() for p in kernel)
    sizes = "M, N, K" + (", O" if form.keep else "")
    rows_doc = "2N (gate | up)" if epilogue.gated else "N"
    accumulators = [f"{acc}{'_int' if form.int8 else ''} = tl.zeros((BLOCK_M, BLOCK_N), "
                    f"dtype={'tl.int32' if form.int8 else 'tl.float32'})" for acc, _ in form.halves]
    if form.four_bit:
        before = ["half = tl.arange(0, BLOCK_K // 2)",
                  "lo_offs = (half // 16) * 32 + half % 16  # the tile's element of each byte's low nibble"]
    else:
        before = ["offs_k = tl.arange(0, BLOCK_K)"]
    loop = _int8_loop(form) if form.int8 else _float_loop(form)
    after = []
    if form.int8:
        after = ["# int32 -> fp32: each row's x_scale, each column's weight scale",
                 "x_scale = tl.load(x_scale_ptr + rows, mask=m_mask, other=0.0)[:, None]"]
        for acc, cols in form.halves:
            after += [f"w_scale = tl.load(scale_ptr + {_paren(cols)}.to(tl.int64) * stride_sn, mask=n_mask, other=0.0)"
                      ".to(tl.float32)[None, :]",
                      f"{acc} = {acc}_int.to(tl.float32) * x_scale * w_scale"]
    if form.keep:
        after += _outlier_loop(form)
    tile_params = "BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr"
    options = "UPCAST: tl.constexpr, DOT: tl.constexpr, GROUP_SIZE: tl.constexpr" + (", BLOCK_O: tl.constexpr" if form.keep else "")
    x_doc = "x's int8 codes (xq, x_scale)" if form.int8 else "x"
    return f'''@triton.jit(do_not_specialize=["M"])  # M varies with the token count: no recompiles
def {name}_kernel(
    # pointers
    {pointers},
    # sizes: out is [M, N]; the weight has {rows_doc} rows of K{"; O outlier features" if form.keep else ""}
    {sizes},
    # strides
    {strides},
    # tile; GROUP_SIZE: weights per scale along K
    {tile_params},
    {options},
):
    """One BLOCK_M x BLOCK_N output tile per program, {x_doc} times the {form.format} weight; programs
    walk M in groups of GROUP_M."""
{TILE_ORDER}
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rows < M
    n_mask = offs_n < N
{_indent(before + accumulators, 4)}
    for k in range(0, tl.cdiv(K, BLOCK_K)):
{_indent(loop, 8)}
{_indent(after, 4) if after else OMIT}

    # epilogue: {", ".join(epilogue.steps) or "none"}
{_indent(epilogue.lines(), 4) if epilogue.lines() else OMIT}
    out_ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])
'''


def _launch(name: str, form: _Form, out_dtype: str) -> str:
    epilogue = form.epilogue
    params = ", ".join(["x", *form.parts, *epilogue.params])
    tensors = form.tensors()
    tensor_args = ", ".join(tensors)
    flatten = [f"    {p} = {p}.expand(out.shape).reshape(-1, N)" for p in epilogue.params if p.startswith("residual")]
    table = "\n".join(f"    ({limit}, [\n" + "".join(f"        {cfg},\n" for cfg in candidates) + "    ]),"
                      for limit, candidates in form.configs)
    prepare = []
    flat = [p for p in ("smooth", "keep") if p in form.parts]  # read as plain arrays
    if flat:
        prepare.append(f"    {', '.join(flat)} = {', '.join(p + '.contiguous()' for p in flat)}")
    if form.keep:
        prepare.append("    outlier = torch.zeros(K, dtype=torch.int8, device=x.device).index_fill_(0, keep, 1)"
                       "  # 1: an outlier feature")
    if form.int8:
        quantize_args = "x" + (", smooth" if form.smooth else "") + (", outlier" if form.keep else "")
        block = min(1024, 1 << max(form.k - 1, 0).bit_length())
        prepare += ["    # x's rows to int8 codes and a scale per row (quantize_dynamic)",
                    "    xq = torch.empty((M, K), dtype=torch.int8, device=x.device)",
                    "    x_scale = torch.empty((M,), dtype=torch.float32, device=x.device)",
                    f"    {name}_quantize_kernel[(M,)]({quantize_args}, xq, x_scale, K, x.stride(0), x.stride(1), "
                    f"BLOCK_K={block})"]
    host_strides = ", ".join(s for _, host in form.strides() for s in host)
    size_args = "M, N, K" + (", keep.shape[0]" if form.keep else "")
    return f'''# (largest M, candidate tiles): the first row whose limit admits M is used; on a GPU the
# fastest candidate is timed once per power-of-two M (fuselm's tuning.py), elsewhere the first
CONFIGS = [
{table}
]


def launch({params}):
    """out[..., N] = epilogue(x[..., K] @ w^T), w the {form.format} weight (parts {", ".join(form.parts)}):
    checks, allocates, {"quantizes x, " if form.int8 else ""}picks the tile, launches."""
    K, N = {form.k}, {form.out_n}
    assert x.shape[-1] == K, f"x {{tuple(x.shape)}} does not have K = {{K}}"
    out = torch.empty((*x.shape[:-1], N), device=x.device, dtype={out_dtype})
    x = x.reshape(-1, K)
    M = x.shape[0]
    if M == 0:
        return out
{chr(10).join(flatten) or OMIT}
    out2d = out.view(-1, N)
{chr(10).join(prepare) or OMIT}
    candidates = next(candidates for limit, candidates in CONFIGS if limit is None or M <= limit)
    shape = ("{name}", power_of_two_bucket(M), N, K)
    cfg = fastest_config(shape, candidates, lambda cfg: launch_tile(cfg, {tensor_args}))
    launch_tile(cfg, {tensor_args})
    return out


def launch_tile(cfg, {tensor_args}):
    """One launch of the gemm kernel with the tile and launch options `cfg`."""
    M, N, K = out2d.shape[0], out2d.shape[1], {form.k}
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    {name}_kernel[grid](
        {tensor_args},
        {size_args},
        {host_strides},
        GROUP_SIZE={form.group_size},{f" BLOCK_O={OUTLIER_BLOCK}," if form.keep else ""} UPCAST=INTERPRETED and {"x" if "x" in tensors else "out2d"}.dtype == torch.bfloat16, **cfg,
    )
'''
