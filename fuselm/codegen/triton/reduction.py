"""Groups with reductions, softmax or cumsum: a short sequence of kernels in one module.

Row nodes are the ops that combine many elements: the reductions (sum, mean, amax, amin,
argmax, argmin, var), softmax / log_softmax and cumsum. Each becomes a kernel of its own,
with the pointwise ops and views that only it reads inlined as its prologue (the
elementwise emitter's IndexCodegen computes them at the loop's coordinates), writing an
intermediate buffer of the node's IR type. The pointwise nodes after the last row node
become a final pointwise kernel (elementwise.py) reading the group's inputs and the
intermediates; `launch` runs the kernels in order (as Inductor splits a fused node).

A row kernel runs one program per row: one output element of a reduction (its kept
coordinates), or one line of softmax / cumsum along its dim. The reduced dims, whichever
they are, are flattened into one index that the program walks in BLOCK-long chunks, so any
reduced size and any set of dims works; each lane keeps its own partial result and the
lanes are combined at the end. Floats accumulate in fp32 (fp64 stays fp64), integer sums
in int64. amax/amin/argmax/argmin see NaN as torch does (it wins; argmax/argmin give the
first index, also on ties); var takes two passes (the mean, then squared deviations);
softmax keeps a running max and a rescaled sum per lane, then a second pass writes.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Callable

from ...errors import UnsupportedKernelError
from ...ir.graph import Node, Value
from ...ir.registry import is_view
from .elementwise import BLOCK as POINTWISE_BLOCK
from .elementwise import IndexCodegen, compute_dtype, helper_sources, literal, pointwise_kernel, symbol_bindings
from .module import GeneratedKernel, torch_dtype_name

REDUCTIONS = ("sum", "mean", "amax", "amin", "argmax", "argmin", "var")
ROW_OPS = ("softmax", "log_softmax", "cumsum")  # one output element per input element
OPS = REDUCTIONS + ROW_OPS
MAX_BLOCK = 1024  # lanes of a row program; a longer row is walked in chunks


@dataclass
class Stage:
    """One kernel of the group: it stores `node` reading `inputs` (group inputs and earlier stages)."""

    node: Node
    inputs: list
    buffer: str  # the host variable holding its result
    symbols: dict = field(default_factory=dict)  # sympy symbol -> size argument
    helpers: set = field(default_factory=set)


def generate(nodes: list, inputs: list) -> GeneratedKernel:
    if not inputs:
        raise UnsupportedKernelError("a group with no inputs has no device to run on")
    for value in [*inputs, *nodes]:
        compute_dtype(value.type.dtype)  # refuses dtypes Triton has no type for
    stages = _stages(nodes, inputs)
    kernels = [_row_kernel(stage) if stage.node.op in OPS else _pointwise_kernel(stage) for stage in stages]
    text = "\n\n".join(k.replace("NAME", f"NAME_{i}") for i, k in enumerate(kernels))
    ops = [n.op for n in nodes if not is_view(n.op)]
    name = "_".join([*dict.fromkeys(ops), nodes[-1].type.dtype, hashlib.sha256(text.encode()).hexdigest()[:6]])
    helpers = set().union(*(stage.helpers for stage in stages))
    body = "\n\n".join(helper_sources(helpers) + [text.replace("NAME", name), _launch(name, stages, inputs)])
    summary = f"{' -> '.join(dict.fromkeys(ops))} into {nodes[-1].type}, {len(stages)} kernel{'s' * (len(stages) > 1)}"
    return GeneratedKernel(name, summary, body, tuple(f"in{i}" for i in range(len(inputs))))


def _stages(nodes: list, inputs: list) -> list:
    """A stage per row node, in order, then the pointwise rest (unless the root is a row node)."""
    root, done = nodes[-1], list(inputs)
    stages = []
    for node in nodes:
        if node.op in OPS:
            buffer = "out" if node is root else f"buf{len(stages)}"
            stages.append(Stage(node, _reads(node.inputs, done), buffer))
            done.append(node)
    if root.op not in OPS:
        stages.append(Stage(root, _reads([root], done), "out"))
    return stages


def _reads(values, done: list) -> list:
    """The already computed values (in `done`'s order) that `values` are computed from."""
    found, stack = set(), list(values)
    while stack:
        value = stack.pop()
        if value in done:
            found.add(value)
        elif isinstance(value, Node):
            stack.extend(value.inputs)
        else:
            raise UnsupportedKernelError(f"{value} is neither a group input nor computed in the group")
    return [v for v in done if v in found]


# ----------------------------------------------------------------------------- row kernels
@dataclass
class Loop:
    """A walk over the row in BLOCK chunks; `body(x, o)` gives the lines for the prologue's
    value `x` (in the accumulator type) at flat output index `o` (None unless `store`)."""

    prefix: str
    body: Callable
    store: bool = False


def _row_kernel(stage: Stage) -> str:
    node, x = stage.node, stage.node.inputs[0]
    reduced, accumulator = _reduced_axes(node), _accumulator(node)
    length = _length(node, stage.symbols)
    rows = IndexCodegen([], stage.symbols, stage.helpers, prefix="k", lanes="lanes")
    kept = rows.output_coordinates([d for axis, d in enumerate(x.type.shape) if axis not in reduced], flat="lanes")
    lines = list(rows.lines)
    for part in _op_lines(node, accumulator, length):
        lines += _loop_lines(stage, part, reduced, kept, accumulator) if isinstance(part, Loop) else [part]
    return _row_kernel_source(stage, length, lines, _describe(node, reduced))


def _loop_lines(stage: Stage, loop: Loop, reduced: list, kept: tuple, accumulator: str) -> list:
    x = stage.node.inputs[0]
    codegen = IndexCodegen(stage.inputs, stage.symbols, stage.helpers, prefix=loop.prefix, lanes="r")
    inner, outer = iter(codegen.output_coordinates([x.type.shape[a] for a in reduced], flat="r")), iter(kept)
    coords = tuple(next(inner) if axis in reduced else next(outer) for axis in range(x.type.rank))
    value = codegen.value(x, coords)
    out = codegen.flat(coords, x.type.shape) if loop.store else None
    if x.type.dtype == "bool" or compute_dtype(x.type.dtype) != accumulator:
        codegen.lines.append(f"{loop.prefix}x = {value}.to({accumulator})")
        value = f"{loop.prefix}x"
    body = codegen.lines + loop.body(value, out)
    head = ["for start in range(0, R, BLOCK):", "    r = start + tl.arange(0, BLOCK).to(tl.int64)", "    mask = r < R"]
    return head + ["    " + line for line in body]


def _reduced_axes(node: Node) -> list:
    rank = node.inputs[0].type.rank
    if node.op in REDUCTIONS and node.op not in ("argmax", "argmin"):
        dims = node.attrs["dims"] or range(rank)
    else:
        dims = (node.attrs["dim"],)
    return sorted({d % rank for d in dims}) if rank else []


def _length(node: Node, symbols: dict) -> str:
    """R, the reduced elements of a row: an int, or an expression of size arguments."""
    return _product([node.inputs[0].type.shape[a] for a in _reduced_axes(node)], symbols)


def _rows(node: Node, symbols: dict) -> str:
    """How many programs: the product of the kept dims."""
    reduced = _reduced_axes(node)
    return _product([d for a, d in enumerate(node.inputs[0].type.shape) if a not in reduced], symbols)


def _product(dims: list, symbols: dict) -> str:
    if all(isinstance(d, int) for d in dims):
        return str(math.prod(dims))
    texts = [IndexCodegen([], symbols).dim(d) for d in dims]
    return " * ".join(text if text.isidentifier() or text.isdigit() else f"({text})" for text in texts)


def _accumulator(node: Node) -> str:
    """The Triton type a row is combined in."""
    dtype = node.inputs[0].type.dtype
    integer = dtype not in ("f64", "f32", "f16", "bf16")
    if node.op in ("sum", "cumsum") and integer:
        return "tl.int64"  # torch sums integers in i64
    if node.op in ("amax", "amin", "argmax", "argmin") and integer:
        return "tl.int64" if dtype == "i64" else "tl.int32"  # narrower ints widen: one type through the loop
    return "tl.float64" if dtype == "f64" else "tl.float32"


def _extreme(accumulator: str, largest: bool) -> str:
    """The largest (or smallest) value of a Triton type, as a literal."""
    if accumulator.startswith("tl.float"):
        return 'float("inf")' if largest else 'float("-inf")'
    bits = int(accumulator.removeprefix("tl.int"))
    return str(2 ** (bits - 1) - 1) if largest else str(-(2 ** (bits - 1)))


STORE_RESULT = "tl.store(out_ptr + row, result.to(out_ptr.dtype.element_ty))"


def _op_lines(node: Node, acc: str, length: str) -> list:
    """The kernel's lines for `node`: plain lines and Loops, ending in its stores."""
    return ROW_LINES[node.op](node, acc, length)


def _sum_lines(node: Node, acc: str, length: str) -> list:
    return [f"acc = tl.zeros((BLOCK,), dtype={acc})",
            Loop("", lambda x, o: [f"acc += tl.where(mask, {x}, 0)"]),
            "result = tl.sum(acc, axis=0)" + (" / R" if node.op == "mean" else ""), STORE_RESULT]


def _var_lines(node: Node, acc: str, length: str) -> list:
    """Two passes: the mean, then the squared deviations from it / max(R - correction, 0)."""
    correction = node.attrs.get("correction", 1)
    divisor = (literal(float(max(int(length) - correction, 0))) if length.isdigit()
               else f"tl.maximum(R - {literal(correction)}, 0)")
    return _sum_lines(node, acc, length)[:2] + [
        "mean = tl.sum(acc, axis=0) / R",
        f"squares = tl.zeros((BLOCK,), dtype={acc})",
        Loop("d", lambda x, o: [f"deviation = tl.where(mask, {x} - mean, 0.0)", "squares += deviation * deviation"]),
        f"result = tl.sum(squares, axis=0) / {divisor}", STORE_RESULT]


def _extremum_lines(node: Node, acc: str, length: str) -> list:
    pick, fold = ("maximum", "max") if node.op == "amax" else ("minimum", "min")
    identity = _extreme(acc, largest=node.op == "amin")
    update = f"acc = tl.{pick}(acc, tl.where(mask, {{x}}, {identity}))"
    lines = [f"acc = tl.full((BLOCK,), {identity}, dtype={acc})"]
    if not acc.startswith("tl.float"):
        return lines + [Loop("", lambda x, o: [update.format(x=x)]), f"result = tl.{fold}(acc, axis=0)", STORE_RESULT]
    return lines + [
        "nan = tl.zeros((BLOCK,), dtype=tl.int32)  # NaN wins, as in torch: flagged apart from the max",
        Loop("", lambda x, o: [update.format(x=x), f"nan = tl.maximum(nan, (mask & ({x} != {x})).to(tl.int32))"]),
        f'result = tl.where(tl.max(nan, axis=0) > 0, float("nan"), tl.{fold}(acc, axis=0))', STORE_RESULT]


def _arg_extremum_lines(node: Node, acc: str, length: str) -> list:
    """Each lane keeps its first best (NaN beats numbers); the lanes then agree on the first index."""
    better, fold = (">", "max") if node.op == "argmax" else ("<", "min")
    worst = _extreme(acc, node.op == "argmin")
    return [
        f"best = tl.full((BLOCK,), {worst}, dtype={acc})  # per lane: its best value so far",
        "best_at = R + tl.zeros((BLOCK,), dtype=tl.int64)  # and where (R: nothing seen yet)",
        Loop("", lambda x, o: [
            f"take = mask & (({x} {better} best) | (best_at == R) | (({x} != {x}) & (best == best)))",
            f"best = tl.where(take, {x}, best)",
            "best_at = tl.where(take, r, best_at)"]),
        "seen = best_at < R",
        "has_nan = tl.max((seen & (best != best)).to(tl.int32), axis=0) > 0",
        f"top = tl.{fold}(tl.where(seen, best, {worst}), axis=0)",
        "winner = seen & tl.where(has_nan, best != best, best == top)",
        "result = tl.min(tl.where(winner, best_at, R), axis=0)  # the first index of the best value",
        STORE_RESULT]


def _softmax_lines(node: Node, acc: str, length: str) -> list:
    """Online: a running max and sum of exp(x - max) per lane, combined; then a pass that writes."""
    write = "tl.exp({x} - row_max) / row_sum" if node.op == "softmax" else "{x} - row_max - tl.log(row_sum)"
    store = "tl.store(out_ptr + {o}, ({y}).to(out_ptr.dtype.element_ty), mask=mask)"
    return [
        f'm = tl.full((BLOCK,), float("-inf"), dtype={acc})  # per lane: running max',
        f"s = tl.zeros((BLOCK,), dtype={acc})  # and sum of exp(x - m)",
        Loop("", lambda x, o: [
            f'x = tl.where(mask, {x}, float("-inf"))',
            "m_new = tl.maximum(m, x)",
            'm_safe = tl.where(m_new == float("-inf"), 0.0, m_new)',
            "s = s * tl.exp(m - m_safe) + tl.exp(x - m_safe)",
            "m = m_new"]),
        "row_max = tl.max(m, axis=0)",
        "row_sum = tl.sum(s * tl.exp(m - row_max), axis=0)",
        Loop("w", lambda x, o: [store.format(o=o, y=write.format(x=x))], store=True)]


def _cumsum_lines(node: Node, acc: str, length: str) -> list:
    scan = "tl.cumsum(chunk, axis=0) + carry"
    return [
        f"carry = tl.zeros((BLOCK,), dtype={acc})  # the sum of the chunks before, in every lane",
        Loop("", lambda x, o: [f"chunk = tl.where(mask, {x}, 0)",
                               f"tl.store(out_ptr + {o}, ({scan}).to(out_ptr.dtype.element_ty), mask=mask)",
                               "carry += tl.sum(chunk, axis=0)"], store=True)]


ROW_LINES = {
    "sum": _sum_lines, "mean": _sum_lines, "var": _var_lines,
    "amax": _extremum_lines, "amin": _extremum_lines, "argmax": _arg_extremum_lines, "argmin": _arg_extremum_lines,
    "softmax": _softmax_lines, "log_softmax": _softmax_lines, "cumsum": _cumsum_lines,
}


def _describe(node: Node, reduced: list) -> str:
    x = node.inputs[0].type
    if node.op in ROW_OPS:
        return f"{node.op} along dim {reduced[0] if reduced else 0} of {x}: one program per line of R elements."
    return f"{node.op} over dims {tuple(reduced)} of {x}: one program per output element, R reduced elements each."


def _row_kernel_source(stage: Stage, length: str, lines: list, doc: str) -> str:
    sizes = list(stage.symbols.values())
    ptrs = ", ".join([f"in{i}_ptr" for i in range(len(stage.inputs))] + ["out_ptr"])
    strides = ", ".join(f"in{i}_s{d}" for i, v in enumerate(stage.inputs) for d in range(v.type.rank))
    no_specialize = ", ".join(f'"{s}"' for s in sizes)
    decorator = "@triton.jit" + (f"(do_not_specialize=[{no_specialize}])  # sizes vary: no recompiles" if sizes else "")
    return f'''{decorator}
def NAME_kernel(
    # pointers: what it reads, then its result
    {ptrs},
    # sizes: the symbolic dimensions
    {", ".join(sizes) + "," if sizes else "# (none)"}
    # strides of each input
    {strides + "," if strides else "# (none)"}
    BLOCK: tl.constexpr,
):
    """{doc}"""
    row = tl.program_id(axis=0).to(tl.int64)
    lanes = row + tl.zeros((BLOCK,), dtype=tl.int64)  # the row in every lane: every load is BLOCK long
    R = {length}
{chr(10).join("    " + line for line in lines)}
'''


# ----------------------------------------------------------------------------- the rest
def _pointwise_kernel(stage: Stage) -> str:
    codegen = IndexCodegen(stage.inputs, stage.symbols, stage.helpers)
    return pointwise_kernel("NAME", stage.node, codegen)


def _launch(name: str, stages: list, inputs: list) -> str:
    params = [f"in{i}" for i in range(len(inputs))]
    host_symbols: dict = {}  # sizes the host expressions (shapes, grids) use
    names = dict(zip(inputs, params))
    calls = []
    for i, stage in enumerate(stages):
        calls += _stage_launch(f"{name}_{i}", stage, names, params[0], host_symbols)
        names[stage.node] = stage.buffer
    symbols = {s: arg for stage in stages for s, arg in stage.symbols.items()}
    symbols.update({s: arg for s, arg in host_symbols.items() if s not in symbols})
    lines = symbol_bindings(symbols, inputs, params) + calls
    return f'''def launch({", ".join(params)}):
    """Binds the sizes, allocates the intermediates and the output, runs the kernels in order."""
{chr(10).join("    " + line for line in lines)}
    return out
'''


def _stage_launch(kernel: str, stage: Stage, names: dict, device: str, host_symbols: dict) -> list:
    node = stage.node
    host = IndexCodegen([], host_symbols)
    shape = ", ".join(host.dim(d) for d in node.type.shape) + ("," if node.type.rank == 1 else "")
    args = [_raw(names[v], v) for v in stage.inputs] + [_raw(stage.buffer, node)]
    sizes = [*stage.symbols.values()]
    strides = [f"*{names[v]}.stride()" for v in stage.inputs if v.type.rank]
    if node.op in OPS:
        what = f"{node.op} of {node.inputs[0].type} -> {stage.buffer} {node.type}"
        length = _length(node, host_symbols)
        block = (str(min(1 << (int(length) - 1).bit_length(), MAX_BLOCK)) if length.isdigit()
                 else f"min(triton.next_power_of_2({length}), {MAX_BLOCK})")
        grid = _rows(node, host_symbols)
    else:
        what = f"pointwise -> {stage.buffer} {node.type}"
        grid, block = f"triton.cdiv(out.numel(), {POINTWISE_BLOCK})", str(POINTWISE_BLOCK)
        sizes.append("out.numel()")
    call = [f"{kernel}_kernel[({grid},)](", f"    {', '.join(args)},"]
    call += [f"    {', '.join(group)}," for group in (sizes, strides) if group] + [f"    BLOCK={block},", ")"]
    dtype = torch_dtype_name(node.type.dtype)
    return [f"# {what}", f"{stage.buffer} = torch.empty(({shape}), device={device}.device, dtype={dtype})",
            f"if {stage.buffer}.numel():", *("    " + line for line in call)]


def _raw(name: str, value: Value) -> str:
    """Bool tensors travel as uint8 views (Triton has no bool pointers)."""
    return f"{name}.view(torch.uint8)" if value.type.dtype == "bool" else name
