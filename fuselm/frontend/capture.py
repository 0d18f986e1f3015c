"""Capture a PyTorch module into fuselm's IR through torch.export.

1. Export the module with symbolic dimensions named by the user (`dynamic`), keyed by
   the forward's parameter names like torch.export's `dynamic_shapes`.
2. If the exported graph holds an op `ATEN_TABLE` does not map, decompose it to core
   ATen, keeping linear, norms, SDPA, gelu, silu, softmax and embedding whole. (Graphs
   the table maps as exported skip the decomposition, which costs more than the export.)
3. Walk the ATen graph once, mapping each op through `ATEN_TABLE`; parameters, buffers
   and lifted constants become named IR constants, user inputs keep their names.
   Outputs are the user outputs, then the final value of every input the model updates
   in place (e.g. the KV cache), so no pass can drop a write. A buffer the model
   updates in place is a graph input (a state input, after the call's tensors) rather
   than a constant, so no pass folds it; `Captured.updates` names what each extra
   output updates. The sizes the traced branches depend on are `Captured.guards`.
4. An op still unmapped after decomposition (or whose handler refuses its arguments,
   `cv.unsupported`, or whose mapping cannot take its complex values) becomes an opaque
   `aten` node that calls the overload (fuselm/ir/aten_op.py), as Inductor's fallback
   kernels; `strict=True` refuses instead, naming the op and the model's source line.
   A multi-result op gets one `aten` node per result the graph reads (attr `index`).
"""
from __future__ import annotations

import ast
import inspect
import operator
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch.export import Dim
from torch.export.graph_signature import InputKind, OutputKind

from ..errors import CaptureError, UnsupportedOpError
from ..ir.aten_op import OP as ATEN_OP, make_attrs
from ..ir.graph import Graph, GraphBuilder, Value
from ..ir.registry import IRTypeError
from ..ir.types import TensorType, as_dim, dim_str, dtype_of, symbol
from .aten_table import ATEN_TABLE, PRESERVED_OPS, register_attention_ops
from .guards import ShapeGuards

_FUSELM_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def capture(module: torch.nn.Module, example_inputs, dynamic: Optional[dict] = None, strict: bool = False) -> Graph:
    """Export `module` on `example_inputs` and convert it to an IR graph.

    `dynamic` maps forward parameter names to `{dim: "SYM"}` or `{dim: ("SYM", min, max)}`;
    the same symbol on two inputs is one dimension, and an expression such as `"N+1"`
    derives a dimension from a symbol used elsewhere. An ATen op with no IR mapping
    becomes an `aten` fallback node (`fuselm.ir.aten_op.fallback_ops(graph)` counts them);
    with `strict=True` it raises UnsupportedOpError naming the op and the source line.
    """
    return capture_module(module, example_inputs, dynamic, strict).graph


@dataclass(frozen=True)
class Captured:
    """A capture and what running its graph as the model needs besides the graph:
    `guards`, the ShapeGuards under which the graph is the model (conditions on symbolic
    sizes of the branches the example took); `updates`, for each graph output past the
    model's results, the name of the graph input it is the new value of (an input or
    state buffer the model updates in place); `state`, {graph input name: buffer name}
    for the module buffers the model updates, which are graph inputs (after the call's
    tensors) rather than constants, so no pass folds them and every call reads the
    buffer as it is then."""
    graph: Graph
    guards: ShapeGuards
    updates: tuple = ()
    state: dict = field(default_factory=dict)


def capture_module(module: torch.nn.Module, example_inputs, dynamic: Optional[dict] = None,
                   strict: bool = False) -> Captured:
    """`capture`, with the guards, updates and state of a Captured."""
    register_attention_ops()
    example_inputs = tuple(example_inputs)
    names = list(inspect.signature(module.forward).parameters)[: len(example_inputs)]
    _check_dynamic(dict(zip(names, example_inputs)), dynamic or {})
    dynamic_shapes, named_dims = _dynamic_shapes(names, dynamic or {})
    with warnings.catch_warnings():  # torch's own deprecation noise about its pytree specs
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        exported = _export(module, example_inputs, dynamic_shapes)
        guards = ShapeGuards.of(exported)
        if unmapped_ops(exported):
            exported = exported.run_decompositions(decomposition_table())
    converter = _Converter(exported, named_dims, strict)
    graph = converter.run()
    return Captured(graph, guards, converter.updates, converter.state)


def _export(module: torch.nn.Module, example_inputs: tuple, dynamic_shapes):
    """torch.export's graph of the module; CaptureError, naming the model's line, where
    torch cannot make one graph of it."""
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    try:
        return torch.export.export(module, example_inputs, dynamic_shapes=dynamic_shapes, strict=False)
    except GuardOnDataDependentSymNode as error:
        raise CaptureError(f"{_model_line(error)}: the model branches on the values in a tensor (or sizes a "
                           "tensor by them), which one graph cannot hold; compute both sides and select with "
                           "torch.where, or pass the value as a Python number") from None
    except Exception as error:
        if "Constraints violated" not in str(error):
            raise
        detail = next((line.strip(" -") for line in str(error).splitlines()[1:] if line.strip()), str(error))
        raise CaptureError(f"{_model_line(error)}: a dim marked dynamic is fixed by the model: {detail}; mark it "
                           "static (dynamic=False) or give the range the model allows") from None


def _model_line(error: BaseException) -> str:
    """file:line `code` of the innermost traceback frame outside torch, fuselm and the
    standard library: the model's code that the failure came from."""
    import sysconfig
    import traceback

    library = [Path(torch.__file__).resolve().parent, Path(__file__).resolve().parents[1],
               Path(sysconfig.get_paths()["stdlib"]).resolve()]
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if not any(Path(f.filename).resolve().is_relative_to(root) for root in library)]
    if not frames:
        return "the model"
    frame = frames[-1]
    return f"{frame.filename}:{frame.lineno} `{(frame.line or '').strip()}`"


def unmapped_ops(exported) -> set:
    """Ops of the exported graph that the table has no entry for."""
    return {str(n.target) for n in exported.graph.nodes if n.op == "call_function" and n.target not in ATEN_TABLE}


def decomposition_table() -> dict:
    table = torch.export.default_decompositions()
    for op in PRESERVED_OPS:
        table.pop(op, None)
    return table


# ----------------------------------------------------------------------------- dynamic shapes
AUTO = "auto"  # a dynamic spec value: symbolic, named by torch (s0, s1...), relations inferred


def _check_dynamic(inputs: dict, dynamic: dict) -> None:
    """Refuse a spec entry that names no tensor dim, naming the parameter and dim."""
    for name, dims in dynamic.items():
        if name not in inputs or dims is None:
            continue  # unknown names are refused with the parameter list below
        if not isinstance(dims, dict):
            raise TypeError(f"dynamic[{name!r}] must be a dict {{dim: symbol}}, got {dims!r}")
        value = inputs[name]
        rank = value.dim() if isinstance(value, torch.Tensor) else None
        for dim, spec in dims.items():
            if rank is None:
                raise ValueError(f"dynamic[{name!r}]: {name} is a {type(value).__name__}, not a tensor")
            if isinstance(dim, bool) or not isinstance(dim, int) or not -rank <= dim < rank:
                raise ValueError(f"dynamic[{name!r}]: dim {dim!r} is not a dim of a rank-{rank} tensor")
            text = spec if isinstance(spec, str) else spec[0] if isinstance(spec, tuple) and spec else None
            if not isinstance(text, str) or not text:
                raise TypeError(f"dynamic[{name!r}][{dim}] must be a symbol such as \"T\", (\"T\", min, max) "
                                f"or \"auto\", got {spec!r}")


def _dynamic_shapes(names: list, dynamic: dict):
    """torch.export's dynamic_shapes for fuselm's spec, and [(input, dim, symbol text)]."""
    unknown = set(dynamic) - set(names)
    if unknown:
        raise ValueError(f"dynamic names {sorted(unknown)} are not parameters of forward{tuple(names)}")
    specs = [(name, dim, spec) for name in names for dim, spec in (dynamic.get(name) or {}).items()]
    shapes = {name: ({} if dynamic.get(name) else None) for name in names}
    for name, dim, spec in [s for s in specs if s[2] == AUTO]:  # torch names it and finds its relations
        shapes[name][dim] = Dim.AUTO
    specs = [s for s in specs if s[2] != AUTO]
    dims = {}
    for _, _, spec in specs:
        text, low, high = (spec, None, None) if isinstance(spec, str) else tuple(spec) + (None,) * (3 - len(spec))
        if text.isidentifier() and (text not in dims or low is not None):
            # torch's Dim names go through sympify, where N, S, E, I... are taken: prefix them.
            dims[text] = Dim(f"fuselm_{text}", **({"min": low} if low is not None else {}), **({"max": high} if high is not None else {}))
    named_dims = []
    for name, dim, spec in specs:
        text = spec if isinstance(spec, str) else spec[0]
        shapes[name][dim] = _torch_dim(text, dims)
        named_dims.append((name, dim, text))
    return (shapes if dynamic else None), named_dims


def _torch_dim(text: str, dims: dict):
    """Evaluate "N" or "N+1" over torch Dims."""

    def evaluate(node):
        if isinstance(node, ast.Name):
            return dims[node.id]
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](evaluate(node.left), evaluate(node.right))
        raise ValueError(f"dynamic dimension {text!r}: use a symbol, optionally plus/times an int")

    return evaluate(ast.parse(text, mode="eval").body)


# ----------------------------------------------------------------------------- conversion
def source_of(fx_node) -> Optional[str]:
    """`file.py:LINE` of the model code that produced an FX node (torch's frames skipped)."""
    trace = fx_node.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+), in \w+\n\s*(.*)', trace)
    frames = [f for f in frames if not f[0].startswith(_FUSELM_DIR)] or frames  # flat_forward's own frame
    frames = [f for f in frames if "/torch/" not in f[0]] or frames
    if not frames:
        return None
    path, line, code = frames[-1]
    return f"{path.rsplit('/', 1)[-1]}:{line} {code.strip()}"


class _Converter:
    def __init__(self, exported, named_dims: list, strict: bool = False):
        self.exported = exported
        self.strict = strict
        self.builder = GraphBuilder()
        self.env: dict = {}
        self.fx_node = None
        self.symbols = self._symbol_map(named_dims)
        self.mutated: dict = {}  # input placeholder -> its latest value (in-place updates)
        self.placeholders: dict = {}  # placeholder name -> its graph input (or constant)
        self.state: dict = {}  # graph input name -> the mutated buffer it carries
        self.updates: tuple = ()  # per extra output, the graph input it updates

    def _symbol_map(self, named_dims: list) -> dict:
        """torch's shape symbols (s0, s72...) -> fuselm's named symbols."""
        placeholders = {n.name: n.meta.get("val") for n in self.exported.graph.nodes if n.op == "placeholder"}
        mapping = {}
        for input_name, dim, text in named_dims:
            size = placeholders[input_name].shape[dim]
            if isinstance(size, torch.SymInt) and size.node.expr.is_Symbol and text.isidentifier():
                mapping[size.node.expr] = symbol(text)
        return mapping

    # -- helpers the table's handlers use
    def dim(self, size) -> Any:
        if isinstance(size, torch.SymInt):
            return as_dim(size.node.expr.xreplace(self.symbols))
        return size

    def is_value(self, x) -> bool:
        return isinstance(x, Value)

    def op(self, name: str, *inputs, **attrs):
        return self.builder.op(name, *inputs, source=self.source, **attrs)

    @property
    def source(self) -> Optional[str]:
        found = source_of(self.fx_node) if self.fx_node is not None else None
        return found.split(" ", 1)[0] if found else None

    def unsupported(self, detail: str = ""):
        raise UnsupportedOpError(str(self.fx_node.target), source_of(self.fx_node), detail)

    def mutate(self, fx_input, value) -> None:
        """An op updated `fx_input` in place: later readers and the outputs see `value`."""
        self.env[fx_input] = value
        self.mutated[fx_input] = value

    def arg(self, a):
        if isinstance(a, torch.fx.Node):
            return self.env[a]
        if isinstance(a, (list, tuple)):
            return type(a)(self.arg(x) for x in a)
        if isinstance(a, torch.SymInt):
            return self.dim(a)
        return a

    # -- the walk
    def run(self) -> Graph:
        signature = self.exported.graph_signature
        specs = {spec.arg.name: spec for spec in signature.input_specs if hasattr(spec.arg, "name")}
        outputs = None
        for fx_node in self.exported.graph.nodes:
            self.fx_node = fx_node
            if fx_node.op == "placeholder":
                self.env[fx_node] = self.placeholders[fx_node.name] = self._placeholder(fx_node, specs[fx_node.name])
            elif fx_node.op == "call_function":
                self.env[fx_node] = self._call(fx_node)
            elif fx_node.op == "output":
                outputs = self._outputs(fx_node, signature)
        state = [v for v in self.builder.inputs if v.name in self.state]  # after the call's tensors
        self.builder.inputs[:] = [v for v in self.builder.inputs if v.name not in self.state] + state
        return self.builder.build(outputs)

    def _placeholder(self, fx_node, spec):
        if spec.kind == InputKind.USER_INPUT:
            val = fx_node.meta["val"]
            shape = tuple(self.dim(s) for s in val.shape)
            return self.builder.input(fx_node.name, TensorType(shape, dtype_of(val.dtype)))
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
            tensor = self.exported.state_dict.get(spec.target)
            if tensor is None:
                tensor = self.exported.constants[spec.target]
            if spec.target in self.exported.graph_signature.buffers_to_mutate.values():
                return self._state_input(spec.target, tensor)
        else:
            tensor = self.exported.constants[spec.target]
        return self.builder.constant(spec.target, tensor.detach())

    def _state_input(self, buffer: str, tensor: torch.Tensor):
        """A buffer the model updates in place: a graph input, fed the buffer at each call."""
        taken = {v.name for v in self.builder.inputs} | set(self.placeholders)
        taken |= {n.name for n in self.exported.graph.nodes if n.op == "placeholder"}
        name = "state_" + re.sub(r"\W", "_", buffer)
        while name in taken:
            name += "_"
        self.state[name] = buffer
        return self.builder.input(name, TensorType.of(tensor))

    def _call(self, fx_node):
        handler = ATEN_TABLE.get(fx_node.target)
        if handler is None:
            symbolic = _symbolic_scalar(self, fx_node)
            if symbolic is not None:
                return symbolic[0]
            if self.strict:
                raise UnsupportedOpError(_op_name(fx_node.target), source_of(fx_node))
            return self._fallback(fx_node)
        args = [self.arg(a) for a in fx_node.args]
        kwargs = {k: self.arg(v) for k, v in fx_node.kwargs.items()}
        mark = len(self.builder.nodes)
        try:
            result = handler(self, *args, **kwargs)
        except (UnsupportedOpError, IRTypeError) as err:
            # The table knows the op but not this use of it (aten.index with several
            # index tensors, say), or the IR op refuses its operand types.
            if self.strict or not _can_fall_back(fx_node):
                raise
            del self.builder.nodes[mark:]
            return self._fallback(fx_node, refused=err)
        mismatch = _complex_mismatch(fx_node, result)
        if mismatch:
            # An IR op whose type rules do not know complex values (exp of c64 says f32):
            # the mapping would lie about the type, so the op falls back as a whole.
            if self.strict:
                raise UnsupportedOpError(_op_name(fx_node.target), source_of(fx_node), mismatch)
            del self.builder.nodes[mark:]
            return self._fallback(fx_node)
        return result

    # -- fallbacks
    def _fallback(self, fx_node, refused: Optional[Exception] = None):
        """An `aten` node calling the op (one per result the graph reads, for tuples)."""
        name = _op_name(fx_node.target)
        if not _can_fall_back(fx_node):
            why = ("it mutates its inputs" if isinstance(fx_node.target, torch._ops.OpOverload)
                   else "it is not an ATen overload torch can call by name")
            raise UnsupportedOpError(name, source_of(fx_node), f"no IR mapping, and no fallback: {why}") from refused
        args = [self.arg(a) for a in fx_node.args]
        kwargs = {k: self.arg(v) for k, v in fx_node.kwargs.items()}
        val = fx_node.meta.get("val")
        if isinstance(val, (tuple, list)):
            return _Results(lambda i: self._aten_node(fx_node, name, args, kwargs, val[i], i), len(val))
        return self._aten_node(fx_node, name, args, kwargs, val, None)

    def _aten_node(self, fx_node, name: str, args, kwargs, val, index: Optional[int]):
        where = "" if index is None else f" (result {index})"
        if not isinstance(val, torch.Tensor):
            raise UnsupportedOpError(name, source_of(fx_node),
                                     f"a fallback needs a tensor result{where}, torch records {type(val).__name__}")
        try:
            dtype = dtype_of(val.dtype)
            shape = tuple(self._result_dim(s) for s in val.shape)
            inputs, attrs = make_attrs(name, args, kwargs, self.is_value, shape, dtype, index)
        except TypeError as err:
            raise UnsupportedOpError(name, source_of(fx_node), f"no fallback: {err}") from None
        found = source_of(fx_node)  # the op's line, also when a later getitem asks for result i
        return self.builder.op(ATEN_OP, *inputs, source=found.split(" ", 1)[0] if found else None, **attrs)

    def _result_dim(self, size):
        """A result dim for an `aten` node's `shape`: a data-dependent size (nonzero's row
        count, torch's unbacked u0) that no input binds is kept as text, out of reach of
        the interpreter's binding (see fuselm/ir/aten_op.py)."""
        dim = self.dim(size)
        bound = set().union(*(v.type.symbols for v in self.builder.inputs))  # (inputs come first)
        return dim if isinstance(dim, int) or dim.free_symbols <= bound else dim_str(dim)

    def _outputs(self, fx_node, signature) -> list:
        values = [self.env[a] for a in fx_node.args[0]]
        specs = signature.output_specs
        user = [v for v, spec in zip(values, specs) if spec.kind == OutputKind.USER_OUTPUT]
        mutations = [(v, spec) for v, spec in zip(values, specs) if spec.kind != OutputKind.USER_OUTPUT]
        updated = [self._updated(spec) for _, spec in mutations] + [self.placeholders[n.name] for n in self.mutated]
        self.updates = tuple(v.name for v in updated)
        return user + [v for v, _ in mutations] + list(self.mutated.values())

    def _updated(self, spec):
        """The graph input an export mutation output writes (a user input or a buffer)."""
        if spec.kind == OutputKind.USER_INPUT_MUTATION:
            return self.placeholders[spec.target]
        if spec.kind == OutputKind.BUFFER_MUTATION:
            placeholder = next(name for name, target in self.exported.graph_signature.inputs_to_buffers.items()
                               if target == spec.target)
            return self.placeholders[placeholder]
        raise UnsupportedOpError(f"an output of kind {spec.kind.name}", None,
                                 "fuselm runs models in inference: it updates inputs and buffers, not gradients")


def _op_name(target) -> str:
    return str(target) if isinstance(target, torch._ops.OpOverload) else getattr(target, "__name__", str(target))


def _can_fall_back(fx_node) -> bool:
    """Only a functional op torch can call by name (not a higher-order op or operator.*)."""
    target = fx_node.target
    return isinstance(target, torch._ops.OpOverload) and not target._schema.is_mutable


def _symbolic_scalar(cv, fx_node) -> Optional[tuple]:
    """(value,) of a Python function on sizes the table lacks (operator.ge on a SymInt,
    feeding a runtime assertion, say), evaluated on the dims; None if it is not one."""
    target = fx_node.target
    if isinstance(target, torch._ops.OpOverload) or not callable(target) or getattr(target, "__module__", None) not in (
            "_operator", "operator", "math", "builtins"):
        return None
    if isinstance(fx_node.meta.get("val"), torch.Tensor) or any(isinstance(a, torch.fx.Node) and isinstance(
            a.meta.get("val"), torch.Tensor) for a in fx_node.all_input_nodes):
        return None
    try:
        return (target(*(cv.arg(a) for a in fx_node.args), **{k: cv.arg(v) for k, v in fx_node.kwargs.items()}),)
    except (TypeError, ValueError, ArithmeticError):
        return None


def _complex_mismatch(fx_node, result) -> str:
    """Why the table's mapping of an op touching complex values is wrong ('' if it is not)."""
    def complex_tensor(x):
        return isinstance(x, torch.Tensor) and x.is_complex()

    scalars = _complex_scalars(fx_node)
    if scalars:
        return f"a complex scalar ({scalars[0]}) cannot be an IR attribute"
    vals = [a.meta.get("val") for a in fx_node.all_input_nodes] + [fx_node.meta.get("val")]
    vals = [v for x in vals for v in (x if isinstance(x, (tuple, list)) else (x,))]
    if not any(complex_tensor(v) for v in vals):
        return ""
    expected = fx_node.meta.get("val")
    pairs = zip(result, expected) if isinstance(result, tuple) and isinstance(expected, (tuple, list)) else [(result, expected)]
    for value, val in pairs:
        if isinstance(value, Value) and isinstance(val, torch.Tensor):
            if value.type.dtype != _ir_dtype(val.dtype) or value.type.rank != val.dim():
                return f"its IR mapping makes {value.type}, torch makes {val.dtype}{list(val.shape)}"
    return ""


def _complex_scalars(fx_node) -> list:
    found: list = []
    torch.fx.node.map_aggregate((fx_node.args, dict(fx_node.kwargs)),
                                lambda x: found.append(x) if isinstance(x, complex) else None)
    return found


def _ir_dtype(torch_dtype) -> Optional[str]:
    try:
        return dtype_of(torch_dtype)
    except TypeError:
        return None


class _Results:
    """The results of a multi-result op that fell back: the `aten` node of result i is
    made when the graph first reads it (operator.getitem), so unused results cost nothing."""

    def __init__(self, make, count: int):
        self._make, self._count, self._made = make, count, {}

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: int):
        index = range(self._count)[index]
        if index not in self._made:
            self._made[index] = self._make(index)
        return self._made[index]

    def __iter__(self):
        return (self[i] for i in range(self._count))
