"""How a model is called: its arguments flattened to named tensors, and its result rebuilt.

`fuselm.compile` takes a model's forward arguments as they come (positional, keyword,
nested in tuples or dicts) and returns what the model returns (a tensor, a tuple, a
dict, a Hugging Face `ModelOutput`). Capture, the IR and the kernels see only a flat
list of tensors. This module is the bridge:

- `CallSignature.of(model, args, kwargs)` binds a call to the forward's signature,
  flattens every argument with torch's pytree, and names each tensor leaf after its
  parameter (`input_ids`; `past_0`, `past_1`... for a nested one). Non-tensor leaves
  (ints, flags, None) are constants of the signature: a new value is another signature.
- `flat_forward(model, signature)`: while active, the model's forward takes the tensors
  by those names, rebuilds the call, runs the real forward and returns the tensor
  leaves of its result, recording the result's structure: what capture exports.
- `rebuild_output(...)` puts computed tensors back into that structure.
"""
from __future__ import annotations

import contextlib
import inspect
import re
from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils import _pytree as pytree


TENSOR = type("Tensor", (), {"__repr__": lambda self: "<tensor>"})()  # a tensor leaf's place
PLAIN_CONSTANTS = (int, float, bool, complex, str, bytes, type(None), torch.dtype, torch.device, torch.memory_format)


@dataclass(frozen=True)
class CallSignature:
    names: tuple  # one per tensor leaf, in order: the captured graph's input names
    spec: object  # the pytree spec of the bound arguments {parameter: value}
    constants: tuple  # the leaves, with TENSOR standing where a tensor goes
    tensor_slots: tuple  # positions of the tensor leaves among the leaves
    parameters: object  # the forward's inspect.Signature
    leaf_names: tuple = ()  # each leaf's name (its parameter and place), for messages

    @staticmethod
    def of(model: torch.nn.Module, args: tuple, kwargs: dict, parameters=None) -> tuple:
        """(signature, tensors) of a call `model(*args, **kwargs)` (`parameters`: the
        forward's inspect.Signature, when the caller has it already)."""
        parameters = parameters or inspect.signature(model.forward)
        try:
            bound = parameters.bind(*args, **kwargs)
        except TypeError as error:
            raise TypeError(f"the compiled model's forward{parameters}: {error}") from None
        leaves, spec = pytree.tree_flatten_with_path(dict(bound.arguments))
        slots = tuple(i for i, (_, leaf) in enumerate(leaves) if isinstance(leaf, torch.Tensor))
        names = _unique_names([_name(path) for path, leaf in leaves if isinstance(leaf, torch.Tensor)])
        constants = tuple(TENSOR if i in slots else leaf for i, (_, leaf) in enumerate(leaves))
        tensors = tuple(leaves[i][1] for i in slots)
        leaf_names = tuple(_name(path) for path, _ in leaves)
        return CallSignature(tuple(names), spec, constants, slots, parameters, leaf_names), tensors

    def guard_key(self) -> tuple:
        """What must be equal for a compiled entry to serve a call: the structure and
        every non-tensor value, with its type (1, 1.0 and True are three guards)."""
        return (str(self.spec), tuple(_guarded(f"argument {name!r}", c) for name, c in zip(self.leaf_names, self.constants)))

    def call(self, forward, tensors) -> object:
        """forward(...) with the original structure and these tensors."""
        leaves = list(self.constants)
        for slot, tensor in zip(self.tensor_slots, tensors):
            leaves[slot] = tensor
        arguments = pytree.tree_unflatten(leaves, self.spec)
        bound = inspect.BoundArguments(self.parameters, arguments)
        return forward(*bound.args, **bound.kwargs)


@dataclass
class OutputRecord:
    """What a traced call returned: the structure and the non-tensor leaves."""
    spec: object = None
    constants: tuple = ()


@contextlib.contextmanager
def flat_forward(model: torch.nn.Module, signature: CallSignature):
    """Yields (shell, record): `shell` is `model` as torch.export should see it, its
    forward taking the signature's tensors by name, calling the real forward with the
    original structure, and returning its result's tensor leaves; the result's structure
    goes into the OutputRecord. The shell is a copy of the module tree sharing every
    parameter and buffer (see `module_shell`), so the weights keep their names and no
    thread calling the model meanwhile sees the flat forward or export's stand-ins."""
    shell, record = module_shell(model), OutputRecord()
    original = shell.forward

    def forward(*tensors):
        leaves, record.spec = pytree.tree_flatten(signature.call(original, tensors))
        record.constants = tuple(TENSOR if isinstance(x, torch.Tensor) else _output_constant(x) for x in leaves)
        return tuple(x for x in leaves if isinstance(x, torch.Tensor))

    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    forward.__signature__ = inspect.Signature([inspect.Parameter(n, kind) for n in signature.names])
    shell.forward = forward
    yield shell, record


def module_shell(module: torch.nn.Module, memo: Optional[dict] = None) -> torch.nn.Module:
    """A new module object per module of the tree, holding the same parameters, buffers
    and attributes (a submodule reached twice is one shell): setting attributes on it, as
    torch.export's non-strict tracing does to swap in fake weights, leaves `module`
    untouched."""
    memo = {} if memo is None else memo
    if id(module) in memo:
        return memo[id(module)]
    shell = module.__class__.__new__(module.__class__)
    memo[id(module)] = shell
    shell.__dict__.update(module.__dict__)
    shell.__dict__["_parameters"] = dict(module._parameters)
    shell.__dict__["_buffers"] = dict(module._buffers)
    shell.__dict__["_modules"] = {name: None if child is None else module_shell(child, memo)
                                  for name, child in module._modules.items()}
    return shell


def rebuild_output(spec, constants: tuple, tensors, sizes=None) -> object:
    """The model's result: `tensors` put back where the tensor leaves were, symbolic sizes
    evaluated with `sizes()` ({symbol name: int}, asked for only when one is returned)."""
    tensors = iter(tensors)
    leaves = [next(tensors) if c is TENSOR else _size(c, sizes) if isinstance(c, SizeLeaf) else c for c in constants]
    return pytree.tree_unflatten(leaves, spec)


def _size(leaf: SizeLeaf, sizes) -> int:
    known = sizes()
    value = leaf.expr.subs({s: known[str(s)] for s in leaf.expr.free_symbols if str(s) in known})
    if not value.is_Integer:
        raise TypeError(f"fuselm.compile: the model returns the size {leaf.expr}, which the input shapes do not "
                        "determine here; return it as a tensor")
    return int(value)


def _name(path) -> str:
    parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
    name = re.sub(r"\W", "_", "_".join(parts)).strip("_") or "arg"
    return name if name[0].isalpha() or name[0] == "_" else f"arg_{name}"


def _unique_names(names: list) -> list:
    seen: dict = {}
    out = []
    for name in names:
        count = seen.get(name, 0)
        seen[name] = count + 1
        out.append(name if count == 0 else f"{name}_{count}")
    return out


def _guarded(where: str, value):
    """A non-tensor argument as a guard: plain values by type and repr (so -0.0 and NaN
    guard as they print); anything else cannot be guarded and is refused."""
    if value is TENSOR:
        return value
    if isinstance(value, torch.SymInt) or not isinstance(value, PLAIN_CONSTANTS):
        raise TypeError(f"fuselm.compile: {where} is a {type(value).__name__}, which is neither a tensor nor a "
                        f"plain constant (int, float, bool, str, None, dtype, device) that a compiled graph can be "
                        f"guarded on; pass tensors, or register the type with torch.utils._pytree")
    return (type(value).__name__, repr(value))


@dataclass(frozen=True)
class SizeLeaf:
    """A size the model returns that depends on symbolic input dims (`x.shape[0]`): its
    expression, evaluated at every call from the input shapes."""
    expr: object


def _output_constant(value):
    """A non-tensor leaf of the model's result: plain values as they are, symbolic sizes as
    SizeLeaf; an unregistered container (it may hold tensors) is refused."""
    if isinstance(value, torch.SymInt):
        return SizeLeaf(value.node.expr)
    if not isinstance(value, PLAIN_CONSTANTS):
        raise TypeError(f"fuselm.compile: the model returns a {type(value).__name__}; compiled models return "
                        "tensors and plain constants in tuples, lists, dicts, namedtuples or other pytree "
                        "containers (register the type with torch.utils._pytree)")
    return value
