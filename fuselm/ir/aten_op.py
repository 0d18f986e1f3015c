"""The `aten` op: an ATen overload with no IR mapping, run by calling it (a fallback).

As Inductor's fallback kernels: the frontend turns an op its table lacks into one opaque
node that records how to call the overload; the reference calls it, partition gives it a
group of its own (the `fallback` flag) and both backends refuse such a group, so it runs
through torch. Text form:

    %1 = aten(%x) {overload="aten._fft_r2c.default", args=[none, [1], 0, false],
                   tensors=[[0]], shape=[B, 8], dtype="c64"} : c64[B,8]   (one line)

Attributes (all printable, hashable, and round-tripping through the text form):
  overload  the overload's name as torch prints it, "<namespace>.<op>.<overload>";
            it is looked up as torch.ops.<namespace>.<op>.<overload>.
  args      the positional arguments in canonical form (`encode_arg`); each slot a tensor
            input fills holds `none`.
  kwargs    (only when there are any) the keyword arguments: [[name, value], ...].
  tensors   where the node's inputs go, one path per input, in input order: [i] is
            positional argument i, [i, j] element j of the list argument i (aten.index's
            indices), ["name"] / ["name", j] a keyword argument. One value may fill
            several slots (mul(x, x) reads %x twice).
  index     (only for ops with several results: tuples or lists) which result the node
            is. A node is made per result the graph uses; each calls the op itself, so
            the op runs once per used result (exact for deterministic ops).
  shape, dtype  the result type torch's fake value recorded at capture; shape entries
            are ints or fuselm's symbolic dims (renamed and bound like any other), or a
            string for a data-dependent size no input determines (nonzero's row count:
            torch's unbacked "u0"), which the interpreter then does not try to bind.

Canonical argument values: none/true/false, ints, floats, dims, strings and (nested)
lists. Values that are not plain data are tagged strings starting with "torch.":
"torch.float32" (a dtype; any torch dtype name), "torch.strided" (a layout),
"torch.contiguous_format" (a memory format), "torch.device" (the device the node runs
on: its first tensor input's, else cpu; a graph is not tied to its capture device) and
"torch.complex(re, im)" (a complex scalar). A real string starting with "torch." or "="
is escaped by one leading "=".
"""
from __future__ import annotations

import re
from typing import Any, Optional

import sympy
import torch

from .registry import IRTypeError, register
from .types import TensorType, as_dim

OP = "aten"
_COMPLEX = re.compile(r"^torch\.complex\(([^,]+),([^)]+)\)$")
_TORCH_VALUES = (torch.dtype, torch.layout, torch.memory_format)  # "torch.<name>" stands for torch.<name>
_DEVICE = "torch.device"


# ----------------------------------------------------------------------------- canonical arguments
def encode_arg(value) -> Any:
    """The canonical, printable form of one non-tensor argument (see the module doc)."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return "=" + value if value.startswith(("torch.", "=")) else value
    if isinstance(value, sympy.Expr):
        return as_dim(value)
    if isinstance(value, (list, tuple)):
        return tuple(encode_arg(v) for v in value)
    if isinstance(value, _TORCH_VALUES):
        return str(value)
    if isinstance(value, torch.device):
        return _DEVICE
    if isinstance(value, complex):
        return f"torch.complex({value.real!r},{value.imag!r})"
    raise TypeError(f"argument {value!r} of type {type(value).__name__} has no canonical form")


def decode_arg(value, device: torch.device) -> Any:
    """The Python value `encode_arg` stood for (lists come back as lists)."""
    if isinstance(value, (list, tuple)):
        return [decode_arg(v, device) for v in value]
    if not isinstance(value, str):
        return value
    if value.startswith("="):
        return value[1:]
    if not value.startswith("torch."):
        return value
    if value == _DEVICE:
        return device
    found = _COMPLEX.match(value)
    if found:
        return complex(float(found.group(1)), float(found.group(2)))
    named = getattr(torch, value[len("torch."):], None)
    if isinstance(named, _TORCH_VALUES):
        return named
    raise ValueError(f"unknown tagged argument {value!r}")


def resolve_overload(name: str):
    """torch.ops.<namespace>.<op>.<overload> for "<namespace>.<op>.<overload>"."""
    parts = name.split(".")
    if len(parts) != 3:
        raise IRTypeError(f"aten: overload {name!r} is not '<namespace>.<op>.<overload>'")
    try:
        return getattr(getattr(getattr(torch.ops, parts[0]), parts[1]), parts[2])
    except (AttributeError, RuntimeError) as err:
        raise IRTypeError(f"aten: torch has no overload {name!r}") from err


def _fill(structure: list, path: tuple, tensor) -> None:
    for key in path[:-1]:
        structure = structure[key]
    structure[path[-1]] = tensor


# ----------------------------------------------------------------------------- the op
def _infer(types: list, attrs: dict) -> TensorType:
    for key in ("overload", "args", "tensors", "shape", "dtype"):
        if key not in attrs:
            raise IRTypeError(f"aten: missing attribute {key!r}")
    if len(types) != len(attrs["tensors"]):
        raise IRTypeError(f"aten {attrs['overload']}: {len(attrs['tensors'])} tensor slots but {len(types)} inputs")
    resolve_overload(attrs["overload"])
    return TensorType(tuple(attrs["shape"]), attrs["dtype"])


def call_overload(tensors, overload: str, args=(), tensors_at=(), kwargs=(), index: Optional[int] = None):
    """Call the overload with `tensors` put at their paths; result `index` if given."""
    device = next((t.device for t in tensors if isinstance(t, torch.Tensor)), torch.device("cpu"))
    positional = decode_arg(tuple(args), device)
    named = {name: decode_arg(value, device) for name, value in kwargs}
    for tensor, path in zip(tensors, tensors_at):
        if isinstance(path[0], str):
            if len(path) == 1:
                named[path[0]] = tensor
            else:
                _fill(named[path[0]], tuple(path[1:]), tensor)
        else:
            _fill(positional, tuple(path), tensor)
    result = resolve_overload(overload)(*positional, **named)
    if index is not None:
        result = result[index]
    if not isinstance(result, torch.Tensor):
        raise TypeError(f"aten {overload}: result {'' if index is None else f'{index} '}is a {type(result).__name__}, not a tensor")
    return result


def _reference(*inputs, **attrs):  # (the attribute `tensors` would shadow a parameter of that name)
    return call_overload(inputs, attrs["overload"], attrs["args"], attrs["tensors"], attrs.get("kwargs", ()),
                         attrs.get("index"))


register(OP, _infer, _reference, inputs=(0, None), fallback=True)


# ----------------------------------------------------------------------------- helpers
def make_attrs(overload: str, args, kwargs: dict, is_tensor, shape, dtype: str, index: Optional[int] = None):
    """(tensor inputs in order, attrs) of an `aten` node calling `overload` on `args`/`kwargs`.

    Tensors are recognized by `is_tensor(x)`, at the top level or inside list arguments;
    their slots become `none` and their paths go to `tensors`. Raises TypeError for an
    argument with no canonical form.
    """
    inputs, paths = [], []

    def strip(value, path):
        if is_tensor(value):
            inputs.append(value)
            paths.append(tuple(path))
            return None
        if isinstance(value, (list, tuple)) and any(is_tensor(v) for v in value):
            return tuple(strip(v, path + [i]) for i, v in enumerate(value))
        return encode_arg(value)

    encoded_args = tuple(strip(a, [i]) for i, a in enumerate(args))
    encoded_kwargs = tuple((k, strip(v, [k])) for k, v in kwargs.items())
    attrs = {"overload": overload, "args": encoded_args}
    if encoded_kwargs:
        attrs["kwargs"] = encoded_kwargs
    attrs["tensors"] = tuple(paths)
    if index is not None:
        attrs["index"] = index
    attrs["shape"] = tuple(d if isinstance(d, str) else as_dim(d) for d in shape)
    attrs["dtype"] = dtype
    return inputs, attrs


def fallback_ops(graph) -> dict:
    """{overload name: how many `aten` nodes call it} for a graph (empty: no fallbacks)."""
    counts: dict = {}
    for node in graph.nodes:
        if node.op == OP:
            counts[node.attrs["overload"]] = counts.get(node.attrs["overload"], 0) + 1
    return counts
