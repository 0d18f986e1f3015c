"""Pointwise groups: elementwise ops with broadcasting, plus the ops that only move
elements (views, concat, gathers, arange, rope), generated as index expressions.

One program computes BLOCK output elements. Each element's coordinates come from its
flat index; every node is then evaluated at coordinates of its own shape, working from
the root to the inputs: a broadcast reads coordinate 0, a permute reorders coordinates,
a reshape goes through the flat index, a slice offsets one, concat picks a part with
tl.where, embedding/index_select load the index first and read the table there. Inputs
are read through their strides, so no copy is made of a strided or broadcast input.
Float math runs in fp32 (fp64 stays fp64) and rounds once at the store; a `cast` to a
narrower float rounds where the IR says. Integer and bool values keep their types.
Symbolic sizes are kernel arguments, bound from the input shapes at launch.
"""
from __future__ import annotations

import hashlib
import math

import sympy

from ...errors import UnsupportedKernelError
from ...ir.graph import Node, Value
from ...ir.types import dim_str
from .device_functions import ACTIVATIONS
from .module import TRITON_NAMES, GeneratedKernel, torch_dtype_name

UNARY = {
    "neg": "-{a}", "abs": "tl.abs({a})", "exp": "tl.exp({a})", "log": "tl.log({a})", "sqrt": "tl.sqrt({a})",
    "rsqrt": "tl.rsqrt({a})", "reciprocal": "1.0 / {a}", "sin": "tl.sin({a})", "cos": "tl.cos({a})",
    "tanh": "2.0 * tl.sigmoid(2.0 * {a}) - 1.0", "erf": "tl.erf({a})", "sigmoid": "tl.sigmoid({a})",
    "relu": "relu({a})", "silu": "silu({a})", "logical_not": "{a} == 0",
}
BINARY = {
    "add": "{a} + {b}", "sub": "{a} - {b}", "mul": "{a} * {b}", "div": "{a} / {b}",
    "maximum": "tl.maximum({a}, {b}{nan})", "minimum": "tl.minimum({a}, {b}{nan})",
    "eq": "{a} == {b}", "ne": "{a} != {b}", "lt": "{a} < {b}", "le": "{a} <= {b}", "gt": "{a} > {b}", "ge": "{a} >= {b}",
    "logical_and": "({a} != 0) & ({b} != 0)", "logical_or": "({a} != 0) | ({b} != 0)", "pow": "pow",
}
MOVES = ("reshape", "permute", "expand", "slice", "select", "concat", "embedding", "index_select", "arange", "full", "rope")
OPS = tuple(UNARY) + tuple(BINARY) + ("gelu", "cast", "where", "masked_fill") + MOVES
RAW_OPERANDS = ("eq", "ne", "lt", "le", "gt", "ge", "cast", "logical_and", "logical_or", "logical_not")
BLOCK = 1024


def compute_dtype(dtype: str) -> str:
    """The Triton type a value of IR `dtype` is computed in."""
    return {"f16": "tl.float32", "bf16": "tl.float32", "f32": "tl.float32"}.get(dtype, TRITON_NAMES[dtype])


def generate(nodes: list, inputs: list) -> GeneratedKernel:
    root = nodes[-1]
    if not inputs:
        raise UnsupportedKernelError("a pointwise group with no inputs has no device to run on")
    codegen = IndexCodegen(inputs)
    coords = codegen.output_coordinates(root.type.shape)
    result = codegen.value(root, coords)
    codegen.lines.append(f"tl.store(out_ptr + offs, {result}.to(out_ptr.dtype.element_ty), mask=mask)")
    kernel = _kernel(len(inputs), codegen, [v.type.rank for v in inputs])
    ops = [n.op for n in nodes if n.op not in ("reshape", "permute", "expand", "slice", "select")] or [root.op]
    digest = hashlib.sha256(kernel.encode()).hexdigest()[:6]
    name = "_".join(["pointwise", *dict.fromkeys(ops), root.type.dtype, digest])
    helpers = [ACTIVATIONS[h] for h in sorted(codegen.helpers)]
    body = "\n\n".join(helpers + [kernel.replace("NAME", name), _launch(name, inputs, root, codegen)])
    summary = f"pointwise {' -> '.join(n.op for n in nodes)} into {root.type}"
    return GeneratedKernel(name, summary, body, tuple(f"in{i}" for i in range(len(inputs))))


class IndexCodegen:
    """Kernel lines computing values at index expressions (strings), memoized."""

    def __init__(self, inputs: list):
        self.inputs = {value: i for i, value in enumerate(inputs)}
        self.symbols: dict = {}  # sympy symbol -> kernel argument name
        self.lines: list = []
        self.helpers: set = set()
        self._indices: dict = {}  # expression -> index variable
        self._values: dict = {}  # (value, coordinates) -> variable

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
            self._indices[expression] = f"j{len(self._indices)}"
            self.lines.append(f"{self._indices[expression]} = {expression}")
        return self._indices[expression]

    def output_coordinates(self, shape) -> tuple:
        coords, rest = [], "offs"
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
                self._values[key] = f"v{sum(line.startswith('v') for line in self.lines)}"
                self.lines.append(f"{self._values[key]} = {expression}")
        return self._values[key]

    def _load(self, value: Value, coords: tuple) -> str:
        i = self.inputs[value]
        offset = " + ".join(f"{c} * in{i}_s{axis}" for axis, c in enumerate(coords) if c != "0") or "0"
        load = f"tl.load(in{i}_ptr + {offset}, mask=mask, other=0)"
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

    def _index_select(self, node, coords):
        source, index = node.inputs
        axis = node.attrs["dim"] % source.type.rank
        row = self.index(f"{self.value(index, (coords[axis],))}.to(tl.int64)")
        return self.value(source, coords[:axis] + (row,) + coords[axis + 1:])

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


def pointwise_expression(node: Node, args: list, helpers: set) -> str:
    op, attrs, ctype = node.op, node.attrs, compute_dtype(node.type.dtype)
    if op in BINARY and len(args) == 1:  # tensor op scalar
        scalar = literal(attrs["scalar"])
        args = [scalar, args[0]] if attrs.get("reverse", False) else [args[0], scalar]
    if op == "pow":
        return _pow(*args)
    if op in BINARY:
        nan = ", propagate_nan=tl.PropagateNan.ALL" if ctype.startswith("tl.float") else ""
        return BINARY[op].format(a=args[0], b=args[1], nan=nan)
    if op in ("relu", "silu", "gelu"):
        helper = "gelu_tanh" if op == "gelu" and attrs.get("approximate", "none") == "tanh" else op
        helpers.add(helper)
        return f"{helper}({args[0]})"
    if op in UNARY:
        return UNARY[op].format(a=args[0])
    if op == "cast":
        return _cast(attrs["dtype"], args[0])
    if op == "where":
        return f"tl.where({args[0]}, {args[1]}, {args[2]})"
    if op == "masked_fill":
        return f"tl.where({args[1]}, {literal(float(attrs['value']))}, {args[0]})"
    raise UnsupportedKernelError(f"no pointwise form for {op}")


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


def _pow(a: str, b: str) -> str:
    try:
        exponent = float(b)
    except ValueError:
        return f"tl.exp2({b} * tl.log2({a}))"  # tensor exponents: positive bases only
    if exponent == 0.5:
        return f"tl.sqrt({a})"
    if exponent.is_integer() and 0 < abs(exponent) <= 4:
        product = " * ".join([a] * int(abs(exponent)))
        return product if exponent > 0 else f"1.0 / ({product})"
    return f"tl.exp2({exponent!r} * tl.log2({a}))"  # positive bases only


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


def _launch(name: str, inputs: list, root: Node, codegen: IndexCodegen) -> str:
    params = [f"in{i}" for i in range(len(inputs))]
    sources = {}
    for i, value in enumerate(inputs):
        for axis, d in enumerate(value.type.shape):
            if isinstance(d, sympy.Symbol):
                sources.setdefault(d, f"{params[i]}.shape[{axis}]")
    missing = [s for s in codegen.symbols if s not in sources]
    if missing:
        raise UnsupportedKernelError(f"sizes {missing} are not dimensions of any input")
    symbols = [f"    {arg} = {sources[s]}" for s, arg in codegen.symbols.items()]
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
