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

import torch
from torch.utils import _pytree as pytree


@dataclass(frozen=True)
class CallSignature:
    names: tuple  # one per tensor leaf, in order: the captured graph's input names
    spec: object  # the pytree spec of the bound arguments {parameter: value}
    constants: tuple  # the leaves, with None standing where a tensor goes
    tensor_slots: tuple  # positions of the tensor leaves among the leaves
    parameters: object  # the forward's inspect.Signature

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
        constants = tuple(None if i in slots else leaf for i, (_, leaf) in enumerate(leaves))
        tensors = tuple(leaves[i][1] for i in slots)
        return CallSignature(tuple(names), spec, constants, slots, parameters), tensors

    def guard_key(self) -> tuple:
        """What must be equal for a compiled entry to serve a call: the structure and
        every non-tensor value."""
        return (str(self.spec), tuple(_hashable(c) for c in self.constants))

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
    """While active, `model.forward` takes the signature's tensors by name, calls the real
    forward with the original structure, and returns its result's tensor leaves; the
    result's structure goes into the yielded OutputRecord. The module itself is what
    torch.export sees, so its weights keep their names."""
    original, record = model.forward, OutputRecord()

    def forward(*tensors):
        leaves, record.spec = pytree.tree_flatten(signature.call(original, tensors))
        record.constants = tuple(None if isinstance(x, torch.Tensor) else x for x in leaves)
        return tuple(x for x in leaves if isinstance(x, torch.Tensor))

    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    forward.__signature__ = inspect.Signature([inspect.Parameter(n, kind) for n in signature.names])
    shadowed = "forward" in model.__dict__
    model.forward = forward
    try:
        yield record
    finally:
        if shadowed:
            model.forward = original
        else:
            del model.forward


def rebuild_output(spec, constants: tuple, tensors) -> object:
    """The model's result: `tensors` put back where the tensor leaves were."""
    tensors = iter(tensors)
    leaves = [next(tensors) if c is None else c for c in constants]
    return pytree.tree_unflatten(leaves, spec)


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


def _hashable(value):
    try:
        hash(value)
        return value
    except TypeError:
        return repr(value)
