"""Pointwise groups: elementwise ops with broadcasting, plus the ops that only move
elements (views, concat, gathers, tril/triu, arange, rope), generated as index expressions.

One program computes BLOCK output elements. Each element's coordinates come from its
flat index; every node is then evaluated at coordinates of its own shape, working from
the root to the inputs: a broadcast reads coordinate 0, a permute reorders coordinates,
a reshape goes through the flat index, a slice offsets one, concat picks a part with
tl.where, embedding/index_select/gather/pack/unpack load the index first and read the
source there (qembedding then reads its row's code and group scale and dequantizes;
unpack's reads are masked off at padding, which gives 0),
tril/triu compare the last two coordinates. Ops that take more than an expression
(round half to even, log1p, expm1, atan, Python's modulo and floor division) call small
device functions pasted into the module; NaN propagates through max/min/relu as in
torch. Inputs are read through their strides, so no copy is made of a strided or
broadcast input.
Float math runs in fp32 (fp64 stays fp64) and rounds once at the store; a `cast` to a
narrower float rounds where the IR says. Integer and bool values keep their types.
Symbolic sizes are kernel arguments, bound from the input shapes at launch.

`IndexCodegen` is also what reduction.py uses to compute a reduction's prologue (the
pointwise ops and views it reads through) at the coordinates of its loop.
"""
from __future__ import annotations

import hashlib
import math
import re

import sympy

from ...errors import UnsupportedKernelError
from ...ir.graph import Node, Value
from ...ir.quant_ops import CHUNK
from ...ir.registry import is_view
from ...ir.types import dim_str
from .device_functions import ACTIVATIONS
from .module import TRITON_NAMES, GeneratedKernel, torch_dtype_name
from .qgemm import _nf4_level_source as nf4_level_source

UNARY = {
    "neg": "-{a}", "abs": "tl.abs({a})", "exp": "tl.exp({a})", "log": "tl.log({a})", "sqrt": "tl.sqrt({a})",
    "rsqrt": "tl.rsqrt({a})", "reciprocal": "1.0 / {a}", "sin": "tl.sin({a})", "cos": "tl.cos({a})",
    "tanh": "2.0 * tl.sigmoid(2.0 * {a}) - 1.0", "erf": "tl.erf({a})", "sigmoid": "tl.sigmoid({a})",
    "relu": "tl.maximum({a}, 0{nan})", "silu": "silu({a})", "logical_not": "{a} == 0",
    "isnan": "{a} != {a}", "isinf": '({a} == float("inf")) | ({a} == float("-inf"))',
    "sign": "({a} > 0).to({t}) - ({a} < 0).to({t})", "floor": "tl.floor({a})", "ceil": "tl.ceil({a})",
    "round": "round_half_even({a})", "trunc": "tl.where({a} < 0, tl.ceil({a}), tl.floor({a}))",
    "log1p": "log1p({a})", "expm1": "expm1({a})", "tan": "tl.sin({a}) / tl.cos({a})", "atan": "atan({a})",
    "copy": "{a}",
}
BINARY = {
    "add": "{a} + {b}", "sub": "{a} - {b}", "mul": "{a} * {b}", "div": "{a} / {b}",
    "maximum": "tl.maximum({a}, {b}{nan})", "minimum": "tl.minimum({a}, {b}{nan})",
    "eq": "{a} == {b}", "ne": "{a} != {b}", "lt": "{a} < {b}", "le": "{a} <= {b}", "gt": "{a} > {b}", "ge": "{a} >= {b}",
    "logical_and": "({a} != 0) & ({b} != 0)", "logical_or": "({a} != 0) | ({b} != 0)",
    "logical_xor": "({a} != 0) != ({b} != 0)", "pow": "pow",
    "remainder": "remainder({a}, {b})", "floor_divide": "floor_divide_{kind}({a}, {b})",
}
INTEGER_IDENTITY = ("floor", "ceil", "round", "trunc")  # integers are already whole numbers
MOVES = ("reshape", "permute", "expand", "slice", "select", "concat", "embedding", "qembedding", "index_select",
         "gather", "pack", "unpack", "tril", "triu", "arange", "full", "rope")
OPS = tuple(UNARY) + tuple(BINARY) + ("gelu", "cast", "where", "masked_fill") + MOVES
RAW_OPERANDS = ("eq", "ne", "lt", "le", "gt", "ge", "cast", "logical_and", "logical_or", "logical_xor", "logical_not",
                "isnan", "isinf")
BLOCK = 1024


def compute_dtype(dtype: str) -> str:
    """The Triton type a value of IR `dtype` is computed in."""
    if dtype not in TRITON_NAMES:
        raise UnsupportedKernelError(f"no Triton kernels for dtype {dtype}")
    return {"f16": "tl.float32", "bf16": "tl.float32", "f32": "tl.float32"}.get(dtype, TRITON_NAMES[dtype])


# Device functions of the pointwise ops that take more than one line (beside the activations).
POINTWISE_HELPERS = {
    "round_half_even": '''@triton.jit
def round_half_even(x):
    """torch.round: the nearest whole number, ties to even (x - floor(x) is exact)."""
    down = tl.floor(x)
    frac = x - down
    odd = down - 2.0 * tl.floor(down * 0.5) != 0.0
    return tl.where((frac > 0.5) | ((frac == 0.5) & odd), down + 1.0, down)
''',
    "log1p": '''@triton.jit
def log1p(x):
    """log(1 + x), exact for tiny x: log(u) * x / (u - 1) cancels the rounding of u = 1 + x."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.where(u == float("inf"), u, tl.log(u) * (x / (u - 1.0))))
''',
    "expm1": '''@triton.jit
def expm1(x):
    """exp(x) - 1, exact for tiny x: (u - 1) * x / log(u) cancels the rounding of u = exp(x)."""
    u = tl.exp(x)
    um1 = u - 1.0
    return tl.where(u == 1.0, x, tl.where((um1 == -1.0) | (u == float("inf")), um1, um1 * (x / tl.log(u))))
''',
    "atan": '''@triton.jit
def atan(x):
    """Arctangent as Cephes' atanf: |x| reduced to [0, tan(pi/8)], then an odd polynomial."""
    a = tl.abs(x)
    big = a > 2.414213562373095
    mid = a > 0.4142135623730950
    t = tl.where(big, -1.0 / a, tl.where(mid, (a - 1.0) / (a + 1.0), a))
    base = tl.where(big, 1.5707963267948966, tl.where(mid, 0.7853981633974483, 0.0))
    z = t * t
    y = base + (((8.05374449538e-2 * z - 1.38776856032e-1) * z + 1.99777106478e-1) * z - 3.33329491539e-1) * z * t + t
    return tl.where(x < 0, -y, y)
''',
    "remainder": '''@triton.jit
def remainder(a, b):
    """Python's modulo (torch.remainder): `%` is C's (the dividend's sign), moved to the divisor's."""
    r = a % b
    return tl.where((r != 0) & ((r < 0) != (b < 0)), r + b, r)
''',
    "floor_divide_int": '''@triton.jit
def floor_divide_int(a, b):
    """torch.floor_divide of integers: `//` truncates, so one less where inexact with signs apart."""
    q = a // b
    return tl.where((q * b != a) & ((a < 0) != (b < 0)), q - 1, q)
''',
    "floor_divide_float": '''@triton.jit
def floor_divide_float(a, b):
    """torch.floor_divide of floats, as torch computes it: (a - fmod(a, b)) / b, corrected."""
    mod = a % b
    div = (a - mod) / b
    div = tl.where((mod != 0) & ((b < 0) != (mod < 0)), div - 1.0, div)
    down = tl.floor(div)
    down = tl.where(div - down > 0.5, down + 1.0, down)
    zero = tl.where(a / b < 0, -0.0, 0.0)
    return tl.where(b == 0, a / b, tl.where(div == 0, zero, down))
''',
    "pow_float": '''@triton.jit
def pow_float(x, y):
    """torch.pow of floats (C99's pow): |x|^y as 2^(y log2|x|), which carries inf, 0 and NaN
    through; the sign of x (-0 included) for an odd integer y; NaN for a finite x < 0 and a
    finite y that is not an integer; 1 for y = 0, x = 1 and (-1)^+-inf."""
    y = tl.where(x == x, y, y).to(x.dtype)  # a literal exponent as a tensor like x (the branches agree)
    m = tl.exp2(y * tl.log2(tl.abs(x)))
    integral = tl.floor(y) == y
    odd = integral & (tl.abs(y) < 16777216.0) & (tl.floor(y * 0.5) * 2.0 != y)
    negative = (x < 0) | ((x == 0) & (1.0 / x < 0))
    result = tl.where(odd & negative, -m, m)
    finite_negative = (x < 0) & (x > -float("inf")) & (tl.abs(y) < float("inf"))
    result = tl.where(finite_negative & ~integral, float("nan"), result)
    unit = (y == 0) | (x == 1) | ((x == -1) & (tl.abs(y) == float("inf")))
    return tl.where(unit, 1.0, result)
''',
    "pow_int": '''@triton.jit
def pow_int(x, y):
    """torch.pow of integers: square and multiply over the exponent's bits (wrapping as
    torch's does); a negative exponent gives 1 / x^|y| truncated: 1 for x = 1, +-1 for
    x = -1, else 0."""
    y = y + x * 0  # both broadcast to the result's shape (a literal exponent made a tensor)
    base = x + y * 0
    exponent = y
    result = base * 0 + 1
    for _ in range(64):
        result = tl.where((exponent & 1) != 0, result * base, result)
        base = base * base
        exponent = exponent >> 1
    odd = (y & 1) != 0
    inverse = tl.where(x == 1, 1, tl.where(x == -1, tl.where(odd, -1, 1), 0))
    return tl.where(y < 0, inverse, result)
''',
}
HELPERS = {**ACTIVATIONS, **POINTWISE_HELPERS, "nf4_level": nf4_level_source()}


def generate(nodes: list, inputs: list) -> GeneratedKernel:
    root = nodes[-1]
    if not inputs:
        raise UnsupportedKernelError("a pointwise group with no inputs has no device to run on")
    codegen = IndexCodegen(inputs)
    kernel = pointwise_kernel("NAME", root, codegen)
    ops = [n.op for n in nodes if not is_view(n.op)] or [root.op]
    digest = hashlib.sha256(kernel.encode()).hexdigest()[:6]
    name = "_".join(["pointwise", *dict.fromkeys(ops), root.type.dtype, digest])
    body = "\n\n".join(helper_sources(codegen.helpers) + [kernel.replace("NAME", name), _launch(name, inputs, root, codegen)])
    summary = f"pointwise {' -> '.join(n.op for n in nodes)} into {root.type}"
    return GeneratedKernel(name, summary, body, tuple(f"in{i}" for i in range(len(inputs))))


def pointwise_kernel(name: str, root: Node, codegen: "IndexCodegen") -> str:
    """The @triton.jit kernel `<name>_kernel` storing `root` (contiguous) at BLOCK elements per program."""
    coords = codegen.output_coordinates(root.type.shape)
    result = codegen.value(root, coords)
    codegen.lines.append(f"tl.store(out_ptr + offs, {result}.to(out_ptr.dtype.element_ty), mask=mask)")
    return _kernel(len(codegen.inputs), codegen, [v.type.rank for v in codegen.inputs]).replace("NAME", name)


def helper_sources(helpers: set) -> list:
    """The source of each device function a kernel calls, in a stable order."""
    return [HELPERS[h] for h in sorted(helpers)]


class IndexCodegen:
    """Kernel lines computing values at index expressions (strings), memoized.

    Several codegens of one kernel (a reduction's loops) share `symbols` and `helpers`
    and keep their variables apart by `prefix`; `lanes` names the kernel's BLOCK-long
    index vector, which a load at no varying coordinate is broadcast over.
    """

    def __init__(self, inputs: list, symbols: dict = None, helpers: set = None, prefix: str = "", lanes: str = "offs"):
        self.inputs = {value: i for i, value in enumerate(inputs)}
        self.symbols: dict = {} if symbols is None else symbols  # sympy symbol -> kernel argument name
        self.lines: list = []
        self.helpers: set = set() if helpers is None else helpers
        self.prefix, self.lanes = prefix, lanes
        self.mask = "mask"  # the lanes loads read (unpack narrows it to its real positions)
        self._indices: dict = {}  # expression -> index variable
        self._values: dict = {}  # (value, coordinates) -> variable
        self._count = 0  # value variables so far

    # ------------------------------------------------------------------ sizes and indices
    def dim(self, d) -> str:
        if isinstance(d, int):
            return str(d)
        for s in sorted(d.free_symbols, key=str):  # sorted: the same source in every process
            self.symbols.setdefault(s, f"size_{s}")
        text = dim_str(d.subs({s: sympy.Symbol(self.symbols[s]) for s in d.free_symbols}))
        if "floor" in text or "/" in text:
            raise UnsupportedKernelError(f"size {dim_str(d)} has no plain integer form")
        return text

    def index(self, expression: str) -> str:
        """An index variable holding `expression` (one line per distinct expression)."""
        if expression not in self._indices:
            self._indices[expression] = f"{self.prefix}j{len(self._indices)}"
            self.lines.append(f"{self._indices[expression]} = {expression}")
        return self._indices[expression]

    def output_coordinates(self, shape, flat: str = "offs") -> tuple:
        """Coordinates in `shape` of the row-major flat index `flat`."""
        coords, rest = [], flat
        for axis in reversed(range(len(shape))):
            size = self.dim(shape[axis])
            coords.insert(0, self.index(f"{rest} % ({size})") if axis else rest)
            if axis:
                rest = self.index(f"{rest} // ({size})")
        return tuple(coords)

    def flat(self, coords: tuple, shape) -> str:
        terms, stride = [], "1"
        for axis in reversed(range(len(shape))):
            terms.append(coords[axis] if stride == "1" else f"{coords[axis]} * ({stride})")
            stride = self.dim(shape[axis]) if stride == "1" else f"{stride} * ({self.dim(shape[axis])})"
        return self.index(" + ".join(reversed(terms)) or "0")

    def broadcast(self, coords: tuple, shape) -> tuple:
        """Coordinates of an operand of `shape` broadcast to coordinates `coords`."""
        tail = coords[len(coords) - len(shape):] if shape else ()
        return tuple("0" if isinstance(d, int) and d == 1 else c for c, d in zip(tail, shape))

    # ------------------------------------------------------------------ values
    def value(self, value: Value, coords: tuple) -> str:
        """The variable holding `value` at `coords` (index variables or integer literals)."""
        key = (value, coords)
        if key not in self._values:
            expression = self._load(value, coords) if value in self.inputs else self._compute(value, coords)
            if expression.isidentifier():  # a view: the same variable
                self._values[key] = expression
            else:
                self._values[key] = f"{self.prefix}v{self._count}"
                self._count += 1
                self.lines.append(f"{self._values[key]} = {expression}")
        return self._values[key]

    def _load(self, value: Value, coords: tuple) -> str:
        i = self.inputs[value]
        offset = " + ".join(f"{c} * in{i}_s{axis}" for axis, c in enumerate(coords) if c != "0") or f"{self.lanes} * 0"
        load = f"tl.load(in{i}_ptr + {offset}, mask={self.mask}, other=0)"
        if value.type.dtype == "bool":  # bool tensors arrive as uint8 views
            return f"{load} != 0"
        return f"{load}.to({compute_dtype(value.type.dtype)})"

    def _operand(self, node: Node, value: Value, coords: tuple) -> str:
        name = self.value(value, self.broadcast(coords, value.type.shape))
        ctype = compute_dtype(node.type.dtype)
        if node.op in RAW_OPERANDS or (node.op in ("where", "masked_fill") and value.type.dtype == "bool"):
            return name
        return name if compute_dtype(value.type.dtype) == ctype else f"{name}.to({ctype})"

    def _compute(self, node: Node, coords: tuple) -> str:
        if node.op in MOVES:
            return getattr(self, f"_{node.op}")(node, coords)
        args = [self._operand(node, v, coords) for v in node.inputs]
        scalar = node.attrs.get("scalar")
        if isinstance(scalar, sympy.Expr):  # a size (x * T): the kernel's size argument
            return pointwise_expression(node, args, self.helpers, f"({self.dim(scalar)})")
        return pointwise_expression(node, args, self.helpers)

    # ------------------------------------------------------------------ element moves
    def _reshape(self, node, coords):
        source = node.inputs[0]
        flat = self.flat(coords, node.type.shape)
        out, rest = [], flat
        for axis in reversed(range(source.type.rank)):
            size = self.dim(source.type.shape[axis])
            out.insert(0, self.index(f"{rest} % ({size})") if axis else rest)
            if axis:
                rest = self.index(f"{rest} // ({size})")
        return self.value(source, tuple(out))

    def _expand(self, node, coords):
        return self.value(node.inputs[0], self.broadcast(coords, node.inputs[0].type.shape))

    def _permute(self, node, coords):
        dims = [d % node.type.rank for d in node.attrs["dims"]]
        inverse = [None] * len(dims)
        for out_axis, in_axis in enumerate(dims):
            inverse[in_axis] = coords[out_axis]
        return self.value(node.inputs[0], tuple(inverse))

    def _slice(self, node, coords):
        axis = node.attrs["dim"] % node.type.rank
        start, step = node.attrs.get("start", 0), node.attrs.get("step", 1)
        moved = list(coords)
        moved[axis] = self.index(f"{self.dim(start)} + {coords[axis]} * {step}")
        return self.value(node.inputs[0], tuple(moved))

    def _select(self, node, coords):
        axis = node.attrs["dim"] % node.inputs[0].type.rank
        index = node.attrs["index"]
        index = str(index) if index >= 0 else self.index(f"{self.dim(node.inputs[0].type.shape[axis])} - {-index}")
        return self.value(node.inputs[0], coords[:axis] + (index,) + coords[axis:])

    def _concat(self, node, coords):
        axis = node.attrs["dim"] % node.type.rank
        parts, offset = [], "0"
        for part in node.inputs:
            if part.type.shape[axis] == 0:  # an empty part (phi3's empty pass-through): nothing to read
                continue
            size = self.dim(part.type.shape[axis])
            local = self.index(f"tl.minimum(tl.maximum({coords[axis]} - ({offset}), 0), {size} - 1)")
            inside = coords[:axis] + (local,) + coords[axis + 1:]
            parts.append((f"{offset} + {size}" if offset != "0" else size, self._operand(node, part, inside)))
            offset = parts[-1][0]
        expression = parts[-1][1]
        for end, name in reversed(parts[:-1]):
            expression = f"tl.where({coords[axis]} < {end}, {name}, {expression})"
        return expression

    def _embedding(self, node, coords):
        table, ids = node.inputs
        row = self.index(f"{self.value(ids, coords[:-1])}.to(tl.int64)")
        return self.value(table, (row, coords[-1]))

    def _qembedding(self, node, coords):
        """embedding over a quantized table (ir/quant_ops.py): the row's code at the column
        (int8 q, or the low / high nibble of byte column // 32 * 16 + column % 16, an nf4
        level for nf4) times its group's scale, plus int4's offset, in fp32."""
        ids, q, scale, *offset = node.inputs
        fmt, column = node.attrs["format"], coords[-1]
        row = self.index(f"{self.value(ids, coords[:-1])}.to(tl.int64)")
        group = self.index(f"{column} // {node.attrs['group_size']}")
        if fmt == "int8":
            code = f"{self.value(q, (row, column))}.to(tl.float32)"
        else:
            half = CHUNK // 2
            byte = self.value(q, (row, self.index(f"{column} // {CHUNK} * {half} + {column} % {half}")))
            nibble = f"tl.where({column} % {CHUNK} < {half}, {byte} & 15, {byte} >> 4)"
            if fmt == "nf4":
                self.helpers.add("nf4_level")
                code = f"nf4_level({nibble}.to(tl.int32))"
            else:
                code = f"{nibble}.to(tl.float32)"
        value = f"{code} * {self.value(scale, (row, group))}"
        return f"{value} + {self.value(offset[0], (row, group))}" if offset else value

    def _index_select(self, node, coords):
        source, index = node.inputs
        axis = node.attrs["dim"] % source.type.rank
        row = self.index(f"{self.value(index, (coords[axis],))}.to(tl.int64)")
        return self.value(source, coords[:axis] + (row,) + coords[axis + 1:])

    def _gather(self, node, coords):
        source, index = node.inputs
        axis = node.attrs["dim"] % source.type.rank
        row = self.index(f"{self.value(index, coords)}.to(tl.int64)")
        return self.value(source, coords[:axis] + (row,) + coords[axis + 1:])

    def _pack(self, node, coords):
        """pack(x [B, S, ...], tokens [T]): row t is x's flat row tokens[t] = b * S + s."""
        source, tokens = node.inputs
        flat = self.index(f"{self.value(tokens, coords[:1])}.to(tl.int64)")
        per_sequence = self.dim(source.type.shape[1])
        b, s = self.index(f"{flat} // ({per_sequence})"), self.index(f"{flat} % ({per_sequence})")
        return self.value(source, (b, s) + coords[1:])

    def _unpack(self, node, coords):
        """unpack(p [T, ...], positions [B, S]): p's row positions[b, s], 0 where it is < 0
        (padding): the loads under it skip those lanes (an empty p is never read)."""
        packed, positions = node.inputs
        row = self.index(f"{self.value(positions, coords[:2])}.to(tl.int64)")
        outer, self.mask = self.mask, self.index(f"{self.mask} & ({row} >= 0)")
        try:
            read = self._operand(node, packed, (row,) + coords[2:])
        finally:
            self.mask = outer
        return f"tl.where({row} >= 0, {read}, 0)"

    def _triangle(self, node, coords):
        """tril / triu: the element where column - row is on the kept side of `diagonal`, else 0."""
        keep = f"{coords[-1]} - {coords[-2]} {'<=' if node.op == 'tril' else '>='} {node.attrs.get('diagonal', 0)}"
        x = self._operand(node, node.inputs[0], coords)
        return f"({keep}) & {x}" if node.type.dtype == "bool" else f"tl.where({keep}, {x}, 0)"

    _tril = _triu = _triangle

    def _arange(self, node, coords):
        start, step = node.attrs.get("start", 0), node.attrs.get("step", 1)
        return f"({literal(start)} + {coords[0]} * {literal(step)}).to({compute_dtype(node.type.dtype)})"

    def _full(self, node, coords):
        return f"tl.full((BLOCK,), {literal(node.attrs['value'])}, {compute_dtype(node.type.dtype)})"

    def _rope(self, node, coords):
        x, cos, sin = node.inputs
        token, head, d = coords
        half = self.index(f"({self.dim(x.type.shape[-1])}) // 2")
        partner = self.index(f"tl.where({d} < {half}, {d} + {half}, {d} - {half})")
        rotated = f"tl.where({d} < {half}, -{self.value(x, (token, head, partner))}, {self.value(x, (token, head, partner))})"
        cos_v, sin_v = self.value(cos, (token, d)), self.value(sin, (token, d))
        return f"{self.value(x, coords)} * {cos_v} + {rotated} * {sin_v}"


def pointwise_expression(node: Node, args: list, helpers: set, scalar_text: str = None) -> str:
    """`scalar_text`: the scalar operand's spelling when it is not a literal (a size)."""
    op, attrs, ctype = node.op, node.attrs, compute_dtype(node.type.dtype)
    is_float = ctype.startswith("tl.float")
    nan = ", propagate_nan=tl.PropagateNan.ALL" if is_float else ""  # NaN wins, as in torch
    if op in BINARY and len(args) == 1:  # tensor op scalar
        scalar = scalar_text or literal(attrs["scalar"])
        if op in ("remainder", "floor_divide"):  # their device functions take tensors
            scalar = f"tl.full((), {scalar}, {ctype})"
        args = [scalar, args[0]] if attrs.get("reverse", False) else [args[0], scalar]
    if op == "pow":
        expression = _pow(*args, is_float)
        helpers.update(name for name in ("pow_float", "pow_int") if expression.startswith(name))
        return expression
    if op == "gelu":
        op = "gelu_tanh" if attrs.get("approximate", "none") == "tanh" else "gelu"
        expression = f"{op}({args[0]})"
    elif (op in INTEGER_IDENTITY and not is_float) or (op == "sign" and node.type.dtype == "bool"):
        expression = args[0]
    elif op in BINARY:
        expression = BINARY[op].format(a=args[0], b=args[1], nan=nan, kind="float" if is_float else "int")
    elif op in UNARY:
        expression = UNARY[op].format(a=args[0], t=ctype, nan=nan)
    elif op == "cast":
        expression = _cast(attrs["dtype"], args[0])
    elif op == "where":
        expression = f"tl.where({args[0]}, {args[1]}, {args[2]})"
    elif op == "masked_fill":
        expression = f"tl.where({args[1]}, {literal(float(attrs['value']))}, {args[0]})"
    else:
        raise UnsupportedKernelError(f"no pointwise form for {op}")
    helpers.update(name for name in re.findall(r"(?<![.\w])(\w+)\(", expression) if name in HELPERS)
    return expression


def literal(value) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float) and (math.isinf(value) or math.isnan(value)):
        return f'float("{value}")'
    return repr(value)


def _cast(dst: str, a: str) -> str:
    if dst in ("f16", "bf16"):  # round to the narrow type where the graph does
        return f"{a}.to({TRITON_NAMES[dst]}).to(tl.float32)"
    if dst == "bool":
        return f"{a} != 0"
    return f"{a}.to({compute_dtype(dst)})"


def _pow(a: str, b: str, is_float: bool) -> str:
    """Literal exponents torch computes otherwise as it does (+-0.5: sqrt, rsqrt; small
    whole ones: products); the rest by the pow_float / pow_int helpers."""
    try:
        exponent = float(b)
    except ValueError:
        exponent = None  # a tensor exponent
    if is_float and exponent in (0.5, -0.5):
        return f"tl.sqrt({a})" if exponent > 0 else f"tl.rsqrt({a})"
    if exponent is not None and exponent.is_integer() and 0 < abs(exponent) <= 4 and (is_float or exponent > 0):
        product = " * ".join([a] * int(abs(exponent)))
        return product if exponent > 0 else f"1.0 / ({product})"
    return f"pow_float({a}, {b})" if is_float else f"pow_int({a}, {b})"


def _kernel(n_inputs: int, codegen: IndexCodegen, ranks: list) -> str:
    ptrs = ", ".join([f"in{i}_ptr" for i in range(n_inputs)] + ["out_ptr"])
    sizes = ", ".join(list(codegen.symbols.values()) + ["numel"])
    strides = ", ".join(f"in{i}_s{d}" for i in range(n_inputs) for d in range(ranks[i]))
    no_specialize = ", ".join(f'"{s}"' for s in ["numel", *codegen.symbols.values()])
    return f'''@triton.jit(do_not_specialize=[{no_specialize}])  # sizes vary: no recompiles
def NAME_kernel(
    # pointers
    {ptrs},
    # sizes: the symbolic dimensions, then the output's element count
    {sizes},
    # strides of each input
    {strides + "," if strides else ""}
    BLOCK: tl.constexpr,
):
    """BLOCK output elements per program, each computed from its coordinates."""
    offs = tl.program_id(axis=0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
{chr(10).join("    " + line for line in codegen.lines)}
'''


def symbol_bindings(symbols: dict, inputs: list, params: list) -> list:
    """Host lines `size_n0 = in0.shape[0]` binding each kernel size argument from an input's
    shape; a size seen only inside a product (a view's [n0*n1, n2]) is divided out of it."""
    sources, products = {}, []
    for param, value in zip(params, inputs):
        for axis, d in enumerate(value.type.shape):
            if isinstance(d, sympy.Symbol):
                sources.setdefault(d, f"{param}.shape[{axis}]")
            elif isinstance(d, sympy.Expr):
                products.append((d, f"{param}.shape[{axis}]"))
    lines = [f"{symbols[s]} = {sources[s]}" for s in symbols if s in sources]
    for s in [s for s in symbols if s not in sources]:
        for d, size in products:
            rest = sympy.simplify(d / s)
            if s not in rest.free_symbols and rest.free_symbols <= set(sources):
                divisor = dim_str(rest.subs({k: sympy.Symbol(symbols.get(k, f"size_{k}")) for k in rest.free_symbols}))
                lines.append(f"{symbols[s]} = {size} // ({divisor})")
                sources[s] = size
                break
        else:
            raise UnsupportedKernelError(f"size {s} is not a dimension of any input")
    return lines


def _launch(name: str, inputs: list, root: Node, codegen: IndexCodegen) -> str:
    params = [f"in{i}" for i in range(len(inputs))]
    symbols = ["    " + line for line in symbol_bindings(codegen.symbols, inputs, params)]
    out_shape = ", ".join(codegen.dim(d) for d in root.type.shape)
    return f'''def launch({", ".join(params)}):
    """Binds the symbolic sizes, allocates the output, launches."""
{chr(10).join(symbols) or "    pass"}
    out = torch.empty(({out_shape}{"," if root.type.rank == 1 else ""}), device={params[0]}.device, dtype={torch_dtype_name(root.type.dtype)})
    if out.numel() == 0:
        return out
    inputs = [t.view(torch.uint8) if t.dtype == torch.bool else t for t in ({", ".join(params)},)]
    stored = out.view(torch.uint8) if out.dtype == torch.bool else out
    grid = (triton.cdiv(out.numel(), {BLOCK}),)
    {name}_kernel[grid](
        *inputs, stored, {"".join(a + ", " for a in codegen.symbols.values())}out.numel(),
        *(s for t in inputs for s in t.stride()),
        BLOCK={BLOCK},
    )
    return out
'''
