"""Quantized weights and the ops that read them: dequantize, quantize_dynamic, qgemm, qembedding.

A quantized [n, k] weight is a few tensors (its "parts") in one of three formats; the
quantization passes (passes/quantize.py) write them and every kernel reads them as
they are:

  "int8"  q int8 [n, k]; scale [n, G]           w[i, j] = q[i, j] * scale[i, j // group_size]
  "int4"  q uint8 [n, C*16]; scale, offset [n, G]  w = nibble * scale + offset
  "nf4"   q uint8 [n, C*16]; scale [n, G]       w = NF4[nibble] * scale   (QLoRA's absmax form)

G = ceil(k / group_size) groups per row (group_size = k: one scale per output channel);
scale and offset are f16 or f32. 4-bit weights come in chunks of 32 along k (C =
ceil(k / 32); group_size a multiple of 32): byte c*16 + j holds element c*32 + j in its
low nibble and element c*32 + 16 + j in its high nibble, GGUF's own Q4_0 / Q4_1 block
layout, so a kernel unpacks 16 consecutive elements from one vector of 16 bytes. Elements
past k are zero nibbles, never read. GGUF's Q8_0 is "int8" with group_size 32 and an f16
scale, Q4_0 is "int4" with offset = -8 * scale, Q4_1 is "int4" as it is.

Ops (attrs `format`, `group_size`, `n`, `k` describe the weight):
  dequantize(q, scale[, offset][, keep, w_keep]) -> f32 [n, k]; with `outliers` the
      columns `keep` (i64 [O]) are w_keep (f32 [n, O]) instead (LLM.int8's outlier features)
  quantize_dynamic(x[, keep]) {bits=8}: x rounded to int8 per row (last dim, symmetric,
      absmax scale) and back; the features `keep` pass through exactly and do not count
      toward the row's scale
  qgemm(x, *parts, *extras) {..., parts, activations, epilogue}: gemm with a quantized
      weight. `parts` names its inputs after x in order, from ("smooth", "q", "scale",
      "offset", "keep", "w_keep"). activations "float": y = x @ w.T; "int8": x (times
      `smooth`, SmoothQuant's per-feature factor, when present) is quantize_dynamic'd
      first, so a kernel multiplies int8 by int8 into int32. Then the gemm epilogue.
  qembedding(ids, q, scale[, offset]) -> f32 [*ids.shape, k]: the rows `ids` (i64 or i32,
      any shape) of the quantized [n, k] table, dequantized: embedding over a quantized
      table (GGUF's tied Q8_0 token embedding) without the fp32 table; only the gathered
      rows are ever dequantized, in the reference and in the kernels alike
"""
from __future__ import annotations

import torch

from .core_ops import gemm_reference
from .registry import IRTypeError, register
from .types import TensorType, dims_equal

FORMATS = ("int8", "int4", "nf4")
CHUNK = 32  # 4-bit elements per chunk of 16 bytes
PART_NAMES = ("smooth", "q", "scale", "offset", "keep", "w_keep")
ACTIVATIONS = ("float", "int8")
SCALE_DTYPES = ("f16", "f32")

# QLoRA's NormalFloat-4 levels (the quantiles of N(0, 1), scaled to [-1, 1]).
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


def groups(k: int, group_size: int) -> int:
    return -(-k // group_size)


def packed_columns(k: int) -> int:
    """Bytes per row of a 4-bit weight of k columns."""
    return -(-k // CHUNK) * (CHUNK // 2)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """[n, k] codes 0..15 -> uint8 [n, packed_columns(k)] in the chunk layout above."""
    n, k = codes.shape
    chunks = -(-k // CHUNK)
    padded = torch.nn.functional.pad(codes.to(torch.uint8), (0, chunks * CHUNK - k)).reshape(n, chunks, 2, CHUNK // 2)
    return (padded[:, :, 0] | (padded[:, :, 1] << 4)).reshape(n, chunks * CHUNK // 2)


def unpack_nibbles(packed: torch.Tensor, k: int) -> torch.Tensor:
    """The inverse of `pack_nibbles`: int64 codes [n, k]."""
    n, width = packed.shape
    chunks = packed.reshape(n, width // (CHUNK // 2), 1, CHUNK // 2).to(torch.int64)
    codes = torch.cat([chunks & 15, chunks >> 4], dim=2)
    return codes.reshape(n, -1)[:, :k]


def _per_column(t: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    """[n, G] -> [n, k]: each group's value repeated over its columns."""
    return t.float().repeat_interleave(group_size, dim=1)[:, :k]


def dequantize_weight(q, scale, offset=None, *, format: str, group_size: int, n: int, k: int) -> torch.Tensor:
    """The f32 [n, k] weight the parts stand for (the formats above)."""
    if format == "int8":
        return q.float() * _per_column(scale, k, group_size)
    codes = unpack_nibbles(q, k)
    if format == "int4":
        return codes.float() * _per_column(scale, k, group_size) + _per_column(offset, k, group_size)
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float32, device=q.device)
    return levels[codes] * _per_column(scale, k, group_size)


def quantize_rows(x: torch.Tensor, keep=None, bits: int = 8) -> torch.Tensor:
    """quantize_dynamic's reference: symmetric per-row int quantization and back."""
    limit = 2 ** (bits - 1) - 1
    values = x.float()
    if keep is not None:
        values = values.index_fill(-1, keep, 0.0)
    scale = values.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / limit
    result = torch.round(values / scale).clamp(-limit, limit) * scale
    if keep is not None:
        result = result.index_copy(-1, keep, x.float().index_select(-1, keep))
    return result.to(x.dtype)


# ----------------------------------------------------------------------------- types
def _check_weight(op: str, parts: dict, attrs: dict) -> tuple:
    fmt, group_size, n, k = (attrs.get(a) for a in ("format", "group_size", "n", "k"))
    if fmt not in FORMATS:
        raise IRTypeError(f"{op}: format {fmt!r} is not one of {FORMATS}")
    if not all(isinstance(v, int) and v > 0 for v in (group_size, n, k)):
        raise IRTypeError(f"{op}: group_size, n and k must be positive ints, got {group_size}, {n}, {k}")
    if fmt != "int8" and group_size % CHUNK:
        raise IRTypeError(f"{op}: a {fmt} group_size must be a multiple of {CHUNK}, got {group_size}")
    q, scale = parts.get("q"), parts.get("scale")
    if q is None or scale is None:
        raise IRTypeError(f"{op}: a {fmt} weight needs q and scale")
    q_shape, q_dtype = ((n, k), "i8") if fmt == "int8" else ((n, packed_columns(k)), "u8")
    _expect(op, "q", q, q_shape, (q_dtype,))
    _expect(op, "scale", scale, (n, groups(k, group_size)), SCALE_DTYPES)
    if (fmt == "int4") != ("offset" in parts):
        raise IRTypeError(f"{op}: an offset belongs to the int4 format only (format {fmt})")
    if "offset" in parts:
        _expect(op, "offset", parts["offset"], (n, groups(k, group_size)), (scale.dtype,))
    if ("keep" in parts) != ("w_keep" in parts):
        raise IRTypeError(f"{op}: outlier features need both keep and w_keep")
    if "keep" in parts:
        keep = parts["keep"]
        if keep.rank != 1 or keep.dtype != "i64":
            raise IRTypeError(f"{op}: keep must be i64 [O], got {keep}")
        _expect(op, "w_keep", parts["w_keep"], (n, keep.shape[0]), ("f32",))
    return fmt, n, k


def _expect(op: str, name: str, t: TensorType, shape: tuple, dtypes: tuple) -> None:
    if t.rank != len(shape) or not all(dims_equal(a, b) for a, b in zip(t.shape, shape)) or t.dtype not in dtypes:
        wanted = "|".join(dtypes)
        raise IRTypeError(f"{op}: {name} must be {wanted} [{', '.join(map(str, shape))}], got {t}")


def _part_names(fmt: str, outliers: bool = False) -> list:
    """The names of a weight's parts in input order: q, scale[, offset][, keep, w_keep]."""
    return ["q", "scale"] + (["offset"] if fmt == "int4" else []) + (["keep", "w_keep"] if outliers else [])


def _weight_parts(op: str, types: list, attrs: dict, outliers: bool = False) -> dict:
    """{part name: type} of an op whose inputs are the weight's parts in input order;
    their count must be the format's."""
    fmt = attrs.get("format")
    if fmt not in FORMATS:
        raise IRTypeError(f"{op}: format {fmt!r} is not one of {FORMATS}")
    names = _part_names(fmt, outliers)
    if len(types) != len(names):
        raise IRTypeError(f"{op}: a {fmt} weight is {names}, got {len(types)} inputs")
    return dict(zip(names, types))


def _dequantize_infer(types, attrs):
    parts = _weight_parts("dequantize", types, attrs, outliers=attrs.get("outliers", False))
    _, n, k = _check_weight("dequantize", parts, attrs)
    return TensorType((n, k), "f32")


def _dequantize(*parts, format, group_size, n, k, outliers=False):
    named = dict(zip(_part_names(format, outliers), parts))
    w = dequantize_weight(named["q"], named["scale"], named.get("offset"), format=format, group_size=group_size, n=n, k=k)
    if outliers:
        w = w.index_copy(1, named["keep"], named["w_keep"])
    return w


register("dequantize", _dequantize_infer, _dequantize, inputs=(2, 5), transient=True)


def _quantize_dynamic_infer(types, attrs):
    x = types[0]
    if not x.is_float:
        raise IRTypeError(f"quantize_dynamic: x must be floating point, got {x}")
    if attrs.get("bits", 8) != 8:
        raise IRTypeError(f"quantize_dynamic: bits={attrs.get('bits')} (8 only)")
    if len(types) == 2 and (types[1].rank != 1 or types[1].dtype != "i64"):
        raise IRTypeError(f"quantize_dynamic: keep must be i64 [O], got {types[1]}")
    return x


register("quantize_dynamic", _quantize_dynamic_infer, lambda x, keep=None, bits=8: quantize_rows(x, keep, bits),
         inputs=(1, 2), transient=True)


def qgemm_parts(inputs: tuple, attrs: dict) -> tuple:
    """(x, {part name: input}, epilogue extras) of a qgemm's inputs."""
    names = list(attrs.get("parts", ()))
    return inputs[0], dict(zip(names, inputs[1:1 + len(names)])), list(inputs[1 + len(names):])


def _qgemm_infer(types, attrs):
    names = list(attrs.get("parts", ()))
    if not set(names) <= set(PART_NAMES) or len(set(names)) != len(names) or len(types) < 1 + len(names):
        raise IRTypeError(f"qgemm: parts {names} must name distinct inputs among {PART_NAMES}")
    x, parts, extras = qgemm_parts(tuple(types), attrs)
    fmt, n, k = _check_weight("qgemm", parts, attrs)
    activations = attrs.get("activations", "float")
    if activations not in ACTIVATIONS:
        raise IRTypeError(f"qgemm: activations {activations!r} is not one of {ACTIVATIONS}")
    if not x.is_float or not dims_equal(x.shape[-1], k):
        raise IRTypeError(f"qgemm: x {x} must be floating point with K = {k}")
    if "smooth" in parts:
        if activations != "int8":
            raise IRTypeError("qgemm: a smooth factor goes with int8 activations")
        _expect("qgemm", "smooth", parts["smooth"], (k,), ("f32",))
    # The epilogue is gemm's: check it against a float [n, k] weight.
    from .registry import infer_type

    gemm_attrs = {"epilogue": attrs.get("epilogue", ())}
    return infer_type("gemm", [x, TensorType((n, k), x.dtype), *extras], gemm_attrs)


def qgemm_reference(x, *inputs, format, group_size, n, k, parts, activations="float", epilogue=()):
    _, named, extras = qgemm_parts((x, *inputs), {"parts": parts})
    w = dequantize_weight(named["q"], named["scale"], named.get("offset"), format=format, group_size=group_size, n=n, k=k)
    if "keep" in named:
        w = w.index_copy(1, named["keep"], named["w_keep"])
    if "smooth" in named:
        x = x * named["smooth"].to(x.dtype)
    if activations == "int8":
        x = quantize_rows(x, named.get("keep"))
    return gemm_reference(x, w.to(x.dtype), *extras, epilogue=epilogue)


register("qgemm", _qgemm_infer, qgemm_reference, inputs=(3, None), heavy=True)


# ----------------------------------------------------------------------------- qembedding
def _qembedding_infer(types, attrs):
    ids = types[0]
    _, _, k = _check_weight("qembedding", _weight_parts("qembedding", types[1:], attrs), attrs)
    if ids.dtype not in ("i64", "i32"):
        raise IRTypeError(f"qembedding: ids must be i64 or i32, got {ids}")
    return TensorType(ids.shape + (k,), "f32")


def qembedding_reference(ids, q, scale, offset=None, *, format, group_size, n, k):
    """The rows `ids` of the quantized table: each part's rows gathered, then only those
    dequantized (a 49152-row table is never dequantized whole)."""
    rows = ids.reshape(-1).long()
    gathered = [None if part is None else part.index_select(0, rows) for part in (q, scale, offset)]
    w = dequantize_weight(*gathered, format=format, group_size=group_size, n=rows.numel(), k=k)
    return w.reshape(*ids.shape, k)


register("qembedding", _qembedding_infer, qembedding_reference, inputs=(3, 4))
