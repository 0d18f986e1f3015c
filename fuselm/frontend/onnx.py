"""Import an ONNX model (opset 13 and later) into fuselm's IR.

    imported = import_onnx("model.onnx")     # a path, the file's bytes or an onnx.ModelProto
    outputs = fuselm.ir.interpret(imported.graph, *tensors)

Graph inputs that are not initializers become IR inputs (named by their ONNX names,
sanitized to identifiers), their `dim_param` dims IR symbols and unknown dims fresh
symbols; initializers become named IR constants (external data read relative to the
model file). Each node goes through `ONNX_TABLE` (op type -> handler building IR ops).

Shape arithmetic is folded at import time: every ONNX value may carry a *known value*,
the elements the importer can compute from shapes and constants (ints, or sympy
expressions of the symbolic dims, e.g. `Shape -> Gather -> Unsqueeze -> Concat`), so the
arguments the IR needs as attributes (Reshape's shape, Slice's starts, Expand's shape,
Range's bounds...) are static or symbolic dims. A known value becomes a tensor in the
graph only if something reads it as data. An argument that is truly data-dependent
where the IR needs a constant is an UnsupportedOpError naming the node.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional

import numpy as np
import sympy
import torch

from ..errors import FuselmError, UnsupportedOpError
from ..ir.graph import Graph, GraphBuilder, Value
from ..ir.types import TensorType, as_dim, floordiv, symbol

MIN_OPSET = 13
MAX_KNOWN = 4096  # the most elements a known value holds (shape arithmetic is small)
INT64_MAX = 2**63 - 1

# ONNX TensorProto elem_type -> IR dtype
ONNX_DTYPES = {1: "f32", 10: "f16", 16: "bf16", 11: "f64", 3: "i8", 5: "i16", 6: "i32", 7: "i64", 2: "u8", 9: "bool"}
_NP_DTYPES = {"f32": np.float32, "f16": np.float16, "f64": np.float64, "i8": np.int8, "i16": np.int16,
              "i32": np.int32, "i64": np.int64, "u8": np.uint8, "bool": np.bool_}
INT_DTYPES = ("i8", "i16", "i32", "i64", "u8")

# For each op, the inputs whose values the IR needs at import time (shape arguments).
STATIC_INPUTS = {
    "Reshape": (1,), "Expand": (1,), "Slice": (1, 2, 3, 4), "Split": (1,), "Squeeze": (1,), "Unsqueeze": (1,),
    "ReduceSum": (1,), "ReduceMean": (1,), "ReduceMax": (1,), "ConstantOfShape": (0,), "Range": (0, 1, 2),
    "Trilu": (1,), "CumSum": (1,),
}


@dataclass(frozen=True)
class OnnxImport:
    """An imported model: the IR `graph` (inputs: the ONNX graph inputs that are not
    initializers, in order; outputs: the ONNX graph outputs, in order), the original
    ONNX names of its inputs and outputs, and the default domain's opset."""
    graph: Graph
    input_names: tuple
    output_names: tuple
    opset: int


# ----------------------------------------------------------------------------- values
@dataclass
class Tensor:
    """An ONNX value while importing: its type, the IR value standing for it (None until
    something reads it as data) and its known elements (a numpy array; for integer and
    bool values an object array of ints, bools or sympy dims), when known."""
    type: TensorType
    value: Optional[Value] = None
    known: Optional[np.ndarray] = None
    const_name: Optional[str] = None  # an initializer's or Constant's name, for its IR constant


class _NoFold(Exception):
    """A known-value computation that cannot decide (a symbolic comparison...)."""


def _to_torch(array: np.ndarray, dtype: str) -> torch.Tensor:
    array = np.asarray(array)
    if dtype == "bf16":
        if array.dtype.name == "bfloat16":
            return torch.from_numpy(np.array(array).view(np.uint16)).view(torch.bfloat16)
        return torch.from_numpy(np.array(array, dtype=np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.array(array, dtype=_NP_DTYPES[dtype]))


def _is_symbolic(e) -> bool:
    return isinstance(e, sympy.Basic) and not e.is_Integer


def _scalar(e):
    """A known element as a Python number or a sympy dim."""
    if isinstance(e, sympy.Basic):
        if e.is_Integer:
            return int(e)
        if e in (sympy.true, sympy.false):
            return bool(e)
        return e
    if isinstance(e, (np.bool_, bool)):
        return bool(e)
    if isinstance(e, np.integer):
        return int(e)
    if isinstance(e, np.floating):
        return float(e)
    return e


def _truth(value) -> bool:
    try:
        return bool(value)
    except TypeError:  # an undecidable symbolic relation
        raise _NoFold()


def _trunc_div(a, b):
    if isinstance(a, int) and isinstance(b, int):
        q = abs(a) // abs(b)
        return q if (a >= 0) == (b >= 0) else -q
    if sympy.sympify(a).is_nonnegative and sympy.sympify(b).is_positive:
        return floordiv(as_dim(a), as_dim(b))
    raise _NoFold()


_FOLD = {
    "Add": lambda a, b: as_dim(a + b) if _is_symbolic(a) or _is_symbolic(b) else a + b,
    "Sub": lambda a, b: as_dim(a - b) if _is_symbolic(a) or _is_symbolic(b) else a - b,
    "Mul": lambda a, b: as_dim(a * b) if _is_symbolic(a) or _is_symbolic(b) else a * b,
    "Div": _trunc_div,
    "Equal": lambda a, b: _truth(sympy.Eq(a, b)) if _is_symbolic(a) or _is_symbolic(b) else a == b,
    "Less": lambda a, b: _truth(a < b),
    "Greater": lambda a, b: _truth(a > b),
    "LessOrEqual": lambda a, b: _truth(a <= b),
    "GreaterOrEqual": lambda a, b: _truth(a >= b),
    "And": lambda a, b: bool(a) and bool(b),
    "Or": lambda a, b: bool(a) or bool(b),
}


def _sanitize(name: str, taken: set) -> str:
    base = re.sub(r"[^0-9A-Za-z_]", "_", name) or "v"
    if base[0].isdigit():
        base = "_" + base
    out, i = base, 0
    while out in taken:
        i += 1
        out = f"{base}_{i}"
    taken.add(out)
    return out


# ----------------------------------------------------------------------------- loading
def _load(model, opset_check: bool):
    import onnx
    path = None
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise FuselmError(f"cannot read ONNX model {path}: {e.strerror or e}") from None
    elif isinstance(model, (bytes, bytearray, memoryview)):
        data = bytes(model)
    elif type(model).__name__ == "ModelProto":
        data = None
    else:
        raise FuselmError(f"import_onnx takes a path, bytes or an onnx.ModelProto, got {type(model).__name__}")
    where = str(path) if path is not None else "the ONNX model bytes"
    if data is not None:
        proto = onnx.ModelProto()
        try:
            proto.ParseFromString(data)
        except Exception as e:  # noqa: BLE001 (a DecodeError, or others protobuf raises on bad bytes)
            raise FuselmError(f"{where} is not a valid ONNX model (truncated or corrupt file?): "
                              f"protobuf cannot parse its {len(data)} bytes ({type(e).__name__}: {e})") from None
        model = proto
    if not model.HasField("graph") or (not model.graph.node and not model.graph.output):
        raise FuselmError(f"{where} is not a valid ONNX model: it holds no graph (truncated or corrupt file?)")
    if not model.graph.output:
        raise FuselmError(f"{where} is not a valid ONNX model: its graph has no outputs (truncated file?)")
    opset = next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), None)
    if opset is None:
        raise FuselmError(f"{where} imports no default-domain (ai.onnx) opset")
    if opset < MIN_OPSET and opset_check:
        raise FuselmError(f"{where} uses ONNX opset {opset}; fuselm imports opset {MIN_OPSET} and later "
                          f"(re-export with opset_version>={MIN_OPSET}, or convert the model with "
                          f"onnx.version_converter.convert_version)")
    _load_external(model, path, where)
    return model, opset, where


def _load_external(model, path: Optional[Path], where: str) -> None:
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    base = path.parent if path is not None else Path.cwd()
    for tensor in model.graph.initializer:
        if not uses_external_data(tensor):
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), None)
        file = base / (location or "")
        if not location or not file.is_file():
            raise FuselmError(f"{where}: the external data file {file} of initializer {tensor.name!r} is missing")
        try:
            load_external_data_for_tensor(tensor, str(base))
        except Exception as e:  # noqa: BLE001
            raise FuselmError(f"{where}: cannot read external data file {file} of initializer {tensor.name!r}: {e}") from None
        del tensor.external_data[:]
        tensor.data_location = 0


# ----------------------------------------------------------------------------- the importer
class _Node:
    def __init__(self, proto, inputs, opset):
        from onnx import helper

        self.proto, self.op_type, self.name, self.opset = proto, proto.op_type, proto.name or proto.output[0], opset
        self.inputs = inputs
        self.attrs = {a.name: helper.get_attribute_value(a) for a in proto.attribute}
        self.n_outputs = len(proto.output)

    def input(self, i):
        return self.inputs[i] if i < len(self.inputs) else None

    def attr(self, name, default=None):
        value = self.attrs.get(name, default)
        return value.decode() if isinstance(value, bytes) else value

    @property
    def source(self) -> str:
        return f"ONNX {self.op_type} node {self.name!r}"


class Importer:
    """One import: the builder, the ONNX values so far and the helpers handlers use."""

    def __init__(self, opset: int):
        self.builder = GraphBuilder()
        self.opset = opset
        self.names: set = set()
        self.node: Optional[_Node] = None

    # -- making values
    def op(self, name: str, *inputs, **attrs) -> Tensor:
        values = [self.v(t) for t in inputs]
        node = self.builder.op(name, *values, source=self.node.source if self.node else None, **attrs)
        shape = node.type.shape
        if all(isinstance(d, int) for d in shape) and 0 in shape:
            # an empty result has nothing to compute: a constant (the node is dead code), so no
            # kernel is asked for a zero-size output
            return self.const(np.zeros(shape, dtype=_NP_DTYPES.get(node.type.dtype, np.float32)), node.type.dtype)
        return Tensor(node.type, node)

    def const(self, array, dtype: str, name: Optional[str] = None) -> Tensor:
        """A known tensor (materialized as an IR constant only when read as data)."""
        array = np.asarray(array)
        if dtype in INT_DTYPES or dtype == "bool":
            array = array.astype(object) if array.size <= MAX_KNOWN or array.dtype == object else array
        return Tensor(TensorType(tuple(int(s) for s in array.shape), dtype), None, array, name)

    def v(self, t: Tensor) -> Value:
        """The IR value of `t`, materializing a known value."""
        if t.value is not None:
            return t.value
        known = t.known
        flat = [_scalar(e) for e in known.reshape(-1)] if known.dtype == object else None
        if flat is None or not any(_is_symbolic(e) for e in flat):
            array = known if flat is None else np.array(flat, dtype=object).reshape(known.shape)
            name = _sanitize(t.const_name or "onnx_const", self.names)
            t.value = self.builder.constant(name, _to_torch(array, t.type.dtype))
            return t.value
        pieces = [self.builder.op("full", shape=(1,), value=e, dtype=t.type.dtype) for e in flat]
        value = pieces[0] if len(pieces) == 1 else self.builder.op("concat", *pieces, dim=0)
        if value.type.shape != t.type.shape:
            value = self.builder.op("reshape", value, shape=t.type.shape)
        t.value = value
        return value

    # -- reading known values
    def known(self, t: Optional[Tensor]):
        """t's known elements as an object array (ints, bools, floats, sympy dims), or None."""
        if t is None or t.known is None or t.known.size > MAX_KNOWN:
            return None
        k = t.known if t.known.dtype == object else t.known.astype(object)
        return np.vectorize(_scalar, otypes=[object])(k) if k.size else k

    def ints(self, t: Tensor, what: str) -> list:
        """The known elements of `t` (a shape argument) as a flat list of dims."""
        k = self.known(t)
        if k is None:
            raise UnsupportedOpError(self.node.op_type, self.node.name,
                                     f"its {what} is data-dependent (not computable from shapes and constants at "
                                     f"import time), but the IR needs it as a constant (opset {self.opset})")
        return [as_dim(e) if not isinstance(e, float) else int(e) for e in k.reshape(-1)]

    def int_attr_or_input(self, index: int, attr: str, what: str, default=None):
        t = self.node.input(index)
        if t is not None:
            return self.ints(t, what)
        value = self.node.attr(attr)
        return list(value) if value is not None else default

    def unsupported(self, detail: str):
        raise UnsupportedOpError(self.node.op_type, self.node.name, f"{detail} (opset {self.opset})")


# ----------------------------------------------------------------------------- helpers
def _norm_axis(axis: int, rank: int) -> int:
    if not -max(rank, 1) <= axis < max(rank, 1):
        raise FuselmError(f"axis {axis} out of range for rank {rank}")
    return axis % max(rank, 1)


def _fold_elementwise(cx: Importer, op_type: str, inputs, dtype: str) -> Optional[Tensor]:
    fn = _FOLD.get(op_type)
    knowns = [cx.known(t) for t in inputs]
    if fn is None or any(k is None for k in knowns) or not (dtype in INT_DTYPES or dtype == "bool"):
        return None
    try:
        out = np.vectorize(fn, otypes=[object])(*knowns) if all(k.size for k in knowns) else None
    except (_NoFold, TypeError, ZeroDivisionError):
        return None
    if out is None:
        return None
    return cx.const(out, dtype)


def _reshape(cx: Importer, x: Tensor, shape) -> Tensor:
    shape = tuple(as_dim(d) for d in shape)
    if x.type.shape == shape:
        return x
    k = cx.known(x)
    if k is not None:
        return cx.const(k.reshape(tuple(int(s) for s in shape)), x.type.dtype) if all(isinstance(s, int) for s in shape) \
            else cx.op("reshape", x, shape=shape)
    return cx.op("reshape", x, shape=shape)


def _cast(cx: Importer, x: Tensor, dtype: str) -> Tensor:
    if x.type.dtype == dtype:
        return x
    k = cx.known(x)
    if k is not None and (dtype in INT_DTYPES or dtype == "bool") and x.type.dtype in INT_DTYPES + ("bool",):
        conv = bool if dtype == "bool" else (lambda e: e if _is_symbolic(e) else int(e))
        return cx.const(np.vectorize(conv, otypes=[object])(k) if k.size else k, dtype)
    return cx.op("cast", x, dtype=dtype)


def _full(cx: Importer, shape, value, dtype: str) -> Tensor:
    shape = tuple(as_dim(d) for d in shape)
    if all(isinstance(d, int) for d in shape) and math.prod(shape) <= MAX_KNOWN:
        return cx.const(np.full(shape, value, dtype=_NP_DTYPES.get(dtype, np.float32)), dtype)
    return cx.op("full", shape=shape, value=value, dtype=dtype)


_COMPARISONS = ("eq", "lt", "gt", "le", "ge", "logical_and", "logical_or")


def _binary(ir_op: str):
    def handler(cx: Importer, node: _Node):
        a, b = node.input(0), node.input(1)
        if cx.known(a) is not None and cx.known(b) is not None:
            folded = _fold_elementwise(cx, node.op_type, [a, b], "bool" if ir_op in _COMPARISONS else a.type.dtype)
            if folded is not None:
                return folded
        return cx.op(ir_op, a, b)

    return handler


def _unary(ir_op: str):
    def handler(cx: Importer, node: _Node):
        x = node.input(0)
        if ir_op == "neg" and x.type.dtype in INT_DTYPES:
            k = cx.known(x)
            if k is not None:
                return cx.const(np.vectorize(lambda e: as_dim(-e), otypes=[object])(k) if k.size else k, x.type.dtype)
        return cx.op(ir_op, x)

    return handler


def _div(cx: Importer, node: _Node):
    a, b = node.input(0), node.input(1)
    if a.type.is_float:
        return cx.op("div", a, b)
    folded = _fold_elementwise(cx, "Div", [a, b], a.type.dtype)
    if folded is not None:
        return folded
    # integer division truncates toward zero (C, ONNX Runtime): floor, plus one where the
    # remainder is not zero and the signs differ
    q, r = cx.op("floor_divide", a, b), cx.op("remainder", a, b)
    signs = cx.op("logical_xor", cx.op("lt", a, scalar=0), cx.op("lt", b, scalar=0))
    fix = cx.op("logical_and", cx.op("ne", r, scalar=0), signs)
    return cx.op("add", q, cx.op("cast", fix, dtype=q.type.dtype))


def _pow(cx: Importer, node: _Node):
    x, y = node.input(0), node.input(1)
    return _cast(cx, cx.op("pow", x, y), x.type.dtype)


def _where(cx: Importer, node: _Node):
    c, a, b = node.inputs[:3]
    kc, ka, kb = cx.known(c), cx.known(a), cx.known(b)
    if kc is not None and ka is not None and kb is not None and a.type.dtype in INT_DTYPES:
        try:
            out = np.where(np.vectorize(_truth, otypes=[bool])(kc) if kc.size else kc.astype(bool), ka, kb)
            return cx.const(out, a.type.dtype)
        except _NoFold:
            pass
    return cx.op("where", c, a, b)


def _gelu(cx: Importer, node: _Node):
    return cx.op("gelu", node.input(0), approximate=node.attr("approximate", "none"))


def _cast_node(cx: Importer, node: _Node):
    to = node.attr("to")
    if to not in ONNX_DTYPES:
        cx.unsupported(f"Cast to ONNX type {to}")
    return _cast(cx, node.input(0), ONNX_DTYPES[to])


def _softmax(ir_op: str):
    def handler(cx: Importer, node: _Node):
        x = node.input(0)
        return cx.op(ir_op, x, dim=_norm_axis(node.attr("axis", -1), x.type.rank))

    return handler


def _matmul(cx: Importer, node: _Node):
    a, b = node.input(0), node.input(1)
    a2 = _reshape(cx, a, (1,) + a.type.shape) if a.type.rank == 1 else a
    b2 = _reshape(cx, b, b.type.shape + (1,)) if b.type.rank == 1 else b
    out = cx.op("matmul", a2, b2)
    shape = list(out.type.shape)
    if b.type.rank == 1:
        shape.pop(-1)
    if a.type.rank == 1:
        shape.pop(-1 if b.type.rank == 1 else -2)
    return _reshape(cx, out, shape)


def _transpose2(cx: Importer, x: Tensor) -> Tensor:
    return cx.op("permute", x, dims=(1, 0))


def _gemm(cx: Importer, node: _Node):
    a, b, c = node.input(0), node.input(1), node.input(2)
    alpha, beta = float(node.attr("alpha", 1.0)), float(node.attr("beta", 1.0))
    if node.attr("transA", 0):
        a = _transpose2(cx, a)
    if node.attr("transB", 0):  # B is [N, K]: torch's linear, the IR gemm
        n = b.type.shape[0]
        if c is not None and alpha == 1.0 and beta == 1.0 and c.type.rank == 1 and c.type.shape == (n,) \
                and c.type.dtype == a.type.dtype:
            return cx.op("gemm", a, b, c, epilogue=("bias",))
        y = cx.op("gemm", a, b)
    else:
        y = cx.op("matmul", a, b)
    if alpha != 1.0:
        y = cx.op("mul", y, scalar=alpha)
    if c is not None and beta != 0.0:
        y = cx.op("add", y, c if beta == 1.0 else cx.op("mul", c, scalar=beta))
    return y


def _layer_norm(cx: Importer, node: _Node):
    x, scale, bias = node.input(0), node.input(1), node.input(2)
    rank = x.type.rank
    axis = _norm_axis(node.attr("axis", -1), rank)
    eps = float(node.attr("epsilon", 1e-5))
    stash = ONNX_DTYPES.get(node.attr("stash_type", 1), "f32")
    wants_stats = node.n_outputs > 1 and any(node.proto.output[1:])
    simple = (axis == rank - 1 and not wants_stats and scale.type.rank == 1 and scale.type.dtype == x.type.dtype
              and (bias is None or (bias.type.rank == 1 and bias.type.dtype == x.type.dtype)))
    if simple and x.type.dtype in ("f32", "f64", stash):
        return cx.op("layer_norm", x, *[t for t in (scale, bias) if t is not None], eps=eps)
    dims = tuple(range(axis, rank))
    xs = _cast(cx, x, stash)
    mean = cx.op("mean", xs, dims=dims, keepdim=True)
    d = cx.op("sub", xs, mean)
    var = cx.op("mean", cx.op("mul", d, d), dims=dims, keepdim=True)
    inv = cx.op("rsqrt", cx.op("add", var, scalar=eps))
    y = _cast(cx, cx.op("mul", d, inv), x.type.dtype)
    y = cx.op("mul", y, scale)
    if bias is not None:
        y = cx.op("add", y, bias)
    return [y, mean, inv]


_REDUCE_EMPTY = {"sum": 0, "mean": float("nan"), "amax": None}


def _reduce(ir_op: str):
    def handler(cx: Importer, node: _Node):
        x = node.input(0)
        axes = cx.int_attr_or_input(1, "axes", "axes", [])
        keepdims = bool(node.attr("keepdims", 1))
        if not axes and node.attr("noop_with_empty_axes", 0):
            return x
        rank = x.type.rank
        dims = tuple(sorted({_norm_axis(int(a), rank) for a in axes})) if axes else tuple(range(rank))
        shape = [1 if i in dims else s for i, s in enumerate(x.type.shape) if keepdims or i not in dims]
        if any(x.type.shape[d] == 0 for d in dims):  # an empty set: the reduction's identity
            dtype = x.type.dtype
            if ir_op == "amax":
                value = False if dtype == "bool" else (float("-inf") if x.type.is_float else
                                                       int(np.iinfo(_NP_DTYPES[dtype]).min))
            else:
                value = _REDUCE_EMPTY[ir_op]
            return _full(cx, shape, value, dtype)
        src = x
        if ir_op == "mean" and not x.type.is_float:
            src = cx.op("cast", x, dtype="f64")
        elif ir_op == "amax" and x.type.dtype == "bool":  # any(): the max of 0s and 1s (kernels max numbers)
            src = cx.op("cast", x, dtype="i32")
        out = cx.op(ir_op, src, dims=dims, keepdim=keepdims)
        return _cast(cx, out, x.type.dtype)

    return handler


def _gather(cx: Importer, node: _Node):
    x, idx = node.input(0), node.input(1)
    axis = _norm_axis(node.attr("axis", 0), x.type.rank)
    size = x.type.shape[axis]
    kx, ki = cx.known(x), cx.known(idx)
    if kx is not None and ki is not None and x.type.dtype in INT_DTYPES:
        return cx.const(np.take(kx, np.array(ki, dtype=np.int64), axis=axis), x.type.dtype)
    out_shape = x.type.shape[:axis] + idx.type.shape + x.type.shape[axis + 1:]
    if ki is not None and isinstance(size, int):
        idx = cx.const(np.array([int(i) % size if int(i) < 0 else int(i) for i in ki.reshape(-1)], dtype=np.int64)
                       .reshape(ki.shape), "i64")
    else:
        idx = cx.op("where", cx.op("lt", idx, scalar=0), cx.op("add", idx, scalar=size), idx)
    if axis == 0 and x.type.rank == 2:
        return cx.op("embedding", x, idx)
    flat = _reshape(cx, idx, (idx.type.numel(),))
    return _reshape(cx, cx.op("index_select", x, flat, dim=axis), out_shape)


def _gather_elements(cx: Importer, node: _Node):
    x, idx = node.input(0), node.input(1)
    axis = _norm_axis(node.attr("axis", 0), x.type.rank)
    idx = cx.op("where", cx.op("lt", idx, scalar=0), cx.op("add", idx, scalar=x.type.shape[axis]), idx)
    return cx.op("gather", x, idx, dim=axis)


def _reshape_node(cx: Importer, node: _Node):
    x = node.input(0)
    shape = cx.ints(node.input(1), "target shape")
    allowzero = node.attr("allowzero", 0)
    out = [x.type.shape[i] if (isinstance(d, int) and d == 0 and not allowzero) else d for i, d in enumerate(shape)]
    if -1 in out:
        known = math.prod([sympy.sympify(d) for d in out if not (isinstance(d, int) and d == -1)], start=sympy.Integer(1))
        out[out.index(-1)] = as_dim(sympy.sympify(x.type.numel()) / known)
    return _reshape(cx, x, out)


def _transpose(cx: Importer, node: _Node):
    x = node.input(0)
    perm = node.attr("perm") or list(reversed(range(x.type.rank)))
    k = cx.known(x)
    if k is not None and x.type.dtype in INT_DTYPES:
        return cx.const(np.transpose(k, perm), x.type.dtype)
    return cx.op("permute", x, dims=tuple(_norm_axis(p, x.type.rank) for p in perm))


def _concat(cx: Importer, node: _Node):
    xs = [t for t in node.inputs if t is not None]
    axis = _norm_axis(node.attr("axis"), xs[0].type.rank)
    knowns = [cx.known(t) for t in xs]
    if all(k is not None for k in knowns) and xs[0].type.dtype in INT_DTYPES:
        return cx.const(np.concatenate(knowns, axis=axis), xs[0].type.dtype)
    xs = [t for t in xs if not (isinstance(t.type.shape[axis], int) and t.type.shape[axis] == 0)] or xs[:1]
    return xs[0] if len(xs) == 1 else cx.op("concat", *xs, dim=axis)


def _slice_range(size: int, start: int, end: int, step: int) -> range:
    if start < 0:
        start += size
    if end < 0:
        end += size
    if step > 0:
        start, end = min(max(start, 0), size), min(max(end, 0), size)
    else:
        start, end = min(max(start, 0), size - 1), min(max(end, -1), size - 1)
    return range(start, end, step)


def _slice(cx: Importer, node: _Node):
    x = node.input(0)
    starts, ends = cx.ints(node.input(1), "starts"), cx.ints(node.input(2), "ends")
    axes = cx.ints(node.input(3), "axes") if node.input(3) is not None else list(range(len(starts)))
    steps = cx.ints(node.input(4), "steps") if node.input(4) is not None else [1] * len(starts)
    k = cx.known(x)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = _norm_axis(int(axis), x.type.rank)
        size = x.type.shape[axis]
        if not isinstance(step, int) or step == 0:
            cx.unsupported(f"Slice step {step}")
        if isinstance(size, int) and isinstance(start, int) and isinstance(end, int):
            r = _slice_range(size, start, end, step)
            if k is not None and x.type.dtype in INT_DTYPES:
                k = np.take(k, list(r), axis=axis)
                x = cx.const(k, x.type.dtype)
                continue
            if step < 0:
                x = cx.op("index_select", x, cx.const(np.array(list(r), dtype=np.int64), "i64"), dim=axis)
            elif r.start != 0 or r.stop != size or step != 1:
                if len(r) == 0:
                    x = cx.op("slice", x, dim=axis, start=0, end=0, step=1)
                else:
                    x = cx.op("slice", x, dim=axis, start=r.start, end=r.stop, step=step)
            continue
        if step < 0:  # a symbolic size, backwards
            cx.unsupported("Slice with a negative step over a symbolic dimension")
        start = as_dim(size + start) if isinstance(start, int) and start < 0 else start
        if isinstance(end, int) and end >= INT64_MAX // 2:
            end = None
        elif isinstance(end, int) and end < 0:
            end = as_dim(size + end)
        if isinstance(start, int) and start > INT64_MAX // 2:
            start = size
        if k is not None and x.type.dtype in INT_DTYPES and isinstance(start, int) and (end is None or isinstance(end, int)):
            k = np.take(k, list(range(k.shape[axis]))[start:end:step], axis=axis)
            x = cx.const(k, x.type.dtype)
            continue
        if start == 0 and end is None and step == 1:
            continue
        x = cx.op("slice", x, dim=axis, start=start, end=end, step=step)
    return x


def _split(cx: Importer, node: _Node):
    x = node.input(0)
    axis = _norm_axis(node.attr("axis", 0), x.type.rank)
    size = x.type.shape[axis]
    sizes = cx.int_attr_or_input(1, "split", "split sizes")
    if sizes is None:
        n = node.attr("num_outputs", node.n_outputs)
        if isinstance(size, int):
            chunk = -(-size // n)
            sizes = [min(chunk, size - i * chunk) for i in range(n)]
        else:
            sizes = [floordiv(size, n)] * n
    outs, start = [], 0
    k = cx.known(x)
    for s in sizes:
        end = as_dim(start + s)
        if k is not None and x.type.dtype in INT_DTYPES and isinstance(end, int):
            outs.append(cx.const(np.take(k, list(range(start, end)), axis=axis), x.type.dtype))
        elif start == 0 and (end == size):
            outs.append(x)
        else:
            outs.append(cx.op("slice", x, dim=axis, start=start, end=end, step=1))
        start = end
    return outs


def _squeeze(cx: Importer, node: _Node):
    x = node.input(0)
    axes = cx.int_attr_or_input(1, "axes", "axes")
    rank = x.type.rank
    if axes is None:
        drop = {i for i, s in enumerate(x.type.shape) if isinstance(s, int) and s == 1}
    else:
        drop = {_norm_axis(int(a), rank) for a in axes}
    return _reshape(cx, x, [s for i, s in enumerate(x.type.shape) if i not in drop])


def _unsqueeze(cx: Importer, node: _Node):
    x = node.input(0)
    axes = cx.int_attr_or_input(1, "axes", "axes")
    rank = x.type.rank + len(axes)
    axes = sorted(_norm_axis(int(a), rank) for a in axes)
    shape = list(x.type.shape)
    for a in axes:
        shape.insert(a, 1)
    return _reshape(cx, x, shape)


def _expand(cx: Importer, node: _Node):
    x = node.input(0)
    target = cx.ints(node.input(1), "target shape")
    rank = max(x.type.rank, len(target))
    xs = (1,) * (rank - x.type.rank) + x.type.shape
    ts = [1] * (rank - len(target)) + list(target)
    out = [a if (isinstance(b, int) and b == 1) else b for a, b in zip(xs, ts)]
    k = cx.known(x)
    if k is not None and x.type.dtype in INT_DTYPES and all(isinstance(d, int) for d in out):
        return cx.const(np.broadcast_to(k, out).copy(), x.type.dtype)
    if tuple(out) == x.type.shape:
        return x
    return cx.op("expand", x, shape=tuple(out))


def _flatten(cx: Importer, node: _Node):
    x = node.input(0)
    rank = x.type.rank
    axis = node.attr("axis", 1)
    axis = axis + rank if axis < 0 else axis
    outer = as_dim(math.prod(x.type.shape[:axis], start=sympy.Integer(1)))
    inner = as_dim(math.prod(x.type.shape[axis:], start=sympy.Integer(1)))
    return _reshape(cx, x, (outer, inner))


def _shape(cx: Importer, node: _Node):
    shape = list(node.input(0).type.shape)
    rank = len(shape)
    start, end = node.attr("start", 0), node.attr("end", rank)
    start, end = (max(0, min(rank, s + rank if s < 0 else s)) for s in (start, end))
    return cx.const(np.array(shape[start:end], dtype=object), "i64")


def _constant_of_shape(cx: Importer, node: _Node):
    from onnx import numpy_helper

    shape = cx.ints(node.input(0), "shape")
    value = node.attrs.get("value")
    if value is None:
        return _full(cx, shape, 0.0, "f32")
    dtype = ONNX_DTYPES.get(value.data_type)
    if dtype is None:
        cx.unsupported(f"ConstantOfShape of ONNX type {value.data_type}")
    element = _scalar(numpy_helper.to_array(value).reshape(-1)[0])
    if dtype == "bf16":
        element = float(element)
    return _full(cx, shape, element, dtype)


def _range(cx: Importer, node: _Node):
    start, limit, delta = node.inputs[:3]
    dtype = start.type.dtype
    s, l, d = (cx.ints(t, what)[0] if dtype in INT_DTYPES else None for t, what in
               ((start, "start"), (limit, "limit"), (delta, "delta")))
    if dtype not in INT_DTYPES:  # floats: every bound a constant
        vals = [cx.known(t) for t in (start, limit, delta)]
        if any(v is None for v in vals):
            cx.unsupported("Range with data-dependent float bounds")
        s, l, d = (float(v.reshape(-1)[0]) for v in vals)
        n = max(int(math.ceil((l - s) / d)), 0)
        np_dtype = _NP_DTYPES.get(dtype, np.float32)
        out = (np.asarray(s, dtype=np_dtype) + np.arange(n, dtype=np_dtype) * np.asarray(d, dtype=np_dtype)) \
            if dtype != "bf16" else np.asarray(s, np.float32) + np.arange(n, dtype=np.float32) * np.float32(d)
        return cx.const(out.astype(np_dtype) if dtype != "bf16" else out, dtype)
    if all(isinstance(e, int) for e in (s, l, d)):
        n = max(-(-(l - s) // d), 0)
        return cx.const(np.array([s + i * d for i in range(n)], dtype=object), dtype)
    if not (isinstance(d, int) and d > 0):
        cx.unsupported("Range over a symbolic bound with a step that is not a positive constant")
    return cx.op("arange", start=s, end=l, step=d, dtype=dtype)


def _constant(cx: Importer, node: _Node):
    from onnx import numpy_helper

    a = node.attrs
    if "value" in a:
        t = a["value"]
        dtype = ONNX_DTYPES.get(t.data_type)
        if dtype is None:
            cx.unsupported(f"Constant of ONNX type {t.data_type}")
        return cx.const(numpy_helper.to_array(t), dtype, name=node.proto.output[0])
    if "value_float" in a:
        return cx.const(np.array(a["value_float"], dtype=np.float32), "f32")
    if "value_floats" in a:
        return cx.const(np.array(a["value_floats"], dtype=np.float32), "f32")
    if "value_int" in a:
        return cx.const(np.array(a["value_int"], dtype=np.int64), "i64")
    if "value_ints" in a:
        return cx.const(np.array(a["value_ints"], dtype=np.int64), "i64")
    cx.unsupported(f"Constant with attribute {', '.join(a) or '(none)'}")


def _trilu(cx: Importer, node: _Node):
    x = node.input(0)
    k = cx.ints(node.input(1), "k")[0] if node.input(1) is not None else 0
    return cx.op("triu" if node.attr("upper", 1) else "tril", x, diagonal=k)


def _reverse(cx: Importer, x: Tensor, axis: int) -> Tensor:
    size = x.type.shape[axis]
    if not isinstance(size, int):
        cx.unsupported("a reverse CumSum over a symbolic dimension")
    return cx.op("index_select", x, cx.const(np.arange(size - 1, -1, -1, dtype=np.int64), "i64"), dim=axis)


def _cumsum(cx: Importer, node: _Node):
    x = node.input(0)
    axis = _norm_axis(int(cx.ints(node.input(1), "axis")[0]), x.type.rank)
    reverse, exclusive = node.attr("reverse", 0), node.attr("exclusive", 0)
    src = _reverse(cx, x, axis) if reverse else x
    y = cx.op("cumsum", src, dim=axis)
    y = _cast(cx, y, x.type.dtype)
    if exclusive:
        y = cx.op("sub", y, src)
    return _reverse(cx, y, axis) if reverse else y


def _identity(cx: Importer, node: _Node):
    return node.input(0)


OnnxHandler = Callable[[Importer, _Node], object]
ONNX_TABLE: dict[str, OnnxHandler] = {
    "Add": _binary("add"), "Sub": _binary("sub"), "Mul": _binary("mul"), "Div": _div, "Pow": _pow,
    "Equal": _binary("eq"), "Less": _binary("lt"), "Greater": _binary("gt"), "LessOrEqual": _binary("le"),
    "GreaterOrEqual": _binary("ge"), "And": _binary("logical_and"), "Or": _binary("logical_or"),
    "Not": _unary("logical_not"), "IsNaN": _unary("isnan"),
    "Sqrt": _unary("sqrt"), "Reciprocal": _unary("reciprocal"), "Neg": _unary("neg"), "Exp": _unary("exp"),
    "Log": _unary("log"), "Tanh": _unary("tanh"), "Erf": _unary("erf"), "Sigmoid": _unary("sigmoid"),
    "Relu": _unary("relu"), "Gelu": _gelu, "Where": _where, "Cast": _cast_node,
    "Sin": _unary("sin"), "Cos": _unary("cos"), "Tan": _unary("tan"), "Atan": _unary("atan"),
    "Abs": _unary("abs"), "Floor": _unary("floor"), "Ceil": _unary("ceil"), "Sign": _unary("sign"),
    "Round": _unary("round"),
    "Softmax": _softmax("softmax"), "LogSoftmax": _softmax("log_softmax"),
    "MatMul": _matmul, "Gemm": _gemm, "LayerNormalization": _layer_norm,
    "ReduceMean": _reduce("mean"), "ReduceSum": _reduce("sum"), "ReduceMax": _reduce("amax"),
    "Gather": _gather, "GatherElements": _gather_elements, "Reshape": _reshape_node, "Transpose": _transpose,
    "Concat": _concat, "Slice": _slice, "Split": _split, "Squeeze": _squeeze, "Unsqueeze": _unsqueeze,
    "Expand": _expand, "Flatten": _flatten, "Shape": _shape, "ConstantOfShape": _constant_of_shape,
    "Range": _range, "Constant": _constant, "Identity": _identity, "Trilu": _trilu, "CumSum": _cumsum,
}


# ----------------------------------------------------------------------------- the entry point
def import_onnx(model, opset_check: bool = True, specialize: Optional[Mapping] = None) -> OnnxImport:
    """Import an ONNX model (a path, its bytes or an onnx.ModelProto) into an IR graph.

    `opset_check=False` imports a model whose default opset is below 13 with the
    opset-13+ semantics of each op (right where the ops did not change since).
    `specialize` maps graph input names to values (arrays) fixed at import time: those
    inputs become constants and leave the graph's inputs (a model whose shape
    arguments are inputs gets static shapes)."""
    from onnx import numpy_helper

    model, opset, where = _load(model, opset_check)
    g = model.graph
    cx = Importer(opset)
    specialize = dict(specialize or {})
    env: dict[str, Tensor] = {}
    init_names = {t.name for t in g.initializer}
    for t in g.initializer:
        dtype = ONNX_DTYPES.get(t.data_type)
        if dtype is None:
            raise UnsupportedOpError("initializer", t.name, f"ONNX element type {t.data_type} has no IR dtype")
        try:
            array = numpy_helper.to_array(t)
        except Exception as e:  # noqa: BLE001
            raise FuselmError(f"{where}: initializer {t.name!r} cannot be read ({e})") from None
        env[t.name] = cx.const(array, dtype, name=t.name)
    input_names = []
    dim_names: set = set()
    for vi in g.input:
        if vi.name in init_names:
            continue
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            raise UnsupportedOpError("input", vi.name, "graph inputs must be tensors (not sequences, maps, optionals)")
        dtype = ONNX_DTYPES.get(tt.elem_type)
        if dtype is None:
            raise UnsupportedOpError("input", vi.name, f"ONNX element type {tt.elem_type} has no IR dtype")
        if vi.name in specialize:
            env[vi.name] = cx.const(np.asarray(specialize.pop(vi.name)), dtype, name=vi.name)
            continue
        if not tt.HasField("shape"):
            raise UnsupportedOpError("input", vi.name, "a graph input of unknown rank")
        name = _sanitize(vi.name, cx.names)
        shape = []
        for i, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value") and d.dim_value >= 0 and not d.dim_param:
                shape.append(d.dim_value)
            elif d.dim_param:
                sym = re.sub(r"[^0-9A-Za-z_]", "_", d.dim_param)
                shape.append(symbol(sym if not sym[0].isdigit() else "_" + sym))
            else:
                shape.append(symbol(_sanitize(f"{name}_d{i}", dim_names)))
        value = cx.builder.input(name, TensorType(tuple(shape), dtype))
        env[vi.name] = Tensor(value.type, value)
        input_names.append(vi.name)
    if specialize:
        raise FuselmError(f"{where}: specialize names no graph input: {', '.join(sorted(specialize))}")

    for proto in g.node:
        if proto.domain not in ("", "ai.onnx"):
            raise UnsupportedOpError(proto.op_type, proto.name or proto.output[0],
                                     f"custom domain {proto.domain!r}: fuselm imports only the default ONNX domain "
                                     f"(ai.onnx, opset {opset})")
        inputs = []
        for name in proto.input:
            if not name:
                inputs.append(None)
            elif name not in env:
                raise FuselmError(f"{where} is not a valid ONNX model: node {proto.name or proto.op_type!r} reads "
                                  f"{name!r}, which nothing defines (nodes out of order, or a truncated file?)")
            else:
                inputs.append(env[name])
        handler = ONNX_TABLE.get(proto.op_type)
        if handler is None:
            raise UnsupportedOpError(proto.op_type, proto.name or proto.output[0],
                                     f"ONNX op {proto.op_type} has no mapping to fuselm's IR (opset {opset})")
        node = _Node(proto, inputs, opset)
        cx.node = node
        try:
            result = handler(cx, node)
        except FuselmError:
            raise
        except Exception as e:  # an IR type error, a bad attribute...
            raise FuselmError(f"{node.source} (opset {opset}) cannot be imported: {type(e).__name__}: {e}") from e
        results = list(result) if isinstance(result, (list, tuple)) else [result]
        for name, value in zip(proto.output, results):
            if name:
                env[name] = value
        missing = [n for n in proto.output[len(results):] if n]
        if missing:
            raise UnsupportedOpError(proto.op_type, node.name, f"output(s) {missing} are not supported (opset {opset})")
    cx.node = None
    outputs, output_names = [], []
    for vi in g.output:
        if vi.name not in env:
            raise FuselmError(f"{where} is not a valid ONNX model: graph output {vi.name!r} is never computed")
        outputs.append(cx.v(env[vi.name]))
        output_names.append(vi.name)
    graph = cx.builder.build(outputs).without_unused_constants()
    return OnnxImport(graph, tuple(input_names), tuple(output_names), opset)
