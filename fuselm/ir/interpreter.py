"""The reference interpreter: runs a graph op by op with each op's torch reference.

It is the oracle for every pass and kernel. Symbols in the input types are bound from
the actual input shapes, so attributes like `reshape {shape=[T,9,64]}` get concrete.
"""
from __future__ import annotations

import sympy
import torch

from .graph import Constant, Graph, Input
from .registry import get_op
from .types import evaluate_dim


def bind_symbols(inputs: list, args: tuple) -> dict:
    """Match input types against actual tensors; return {symbol: size}."""
    if len(args) != len(inputs):
        raise TypeError(f"graph takes {len(inputs)} inputs ({', '.join(v.name for v in inputs)}), got {len(args)}")
    bindings: dict = {}
    for value, arg in zip(inputs, args):
        if not isinstance(arg, torch.Tensor) or arg.dim() != value.type.rank or arg.dtype != value.type.torch_dtype:
            got = f"{arg.dtype}{list(arg.shape)}" if isinstance(arg, torch.Tensor) else type(arg).__name__
            raise TypeError(f"input %{value.name} expects {value.type}, got {got}")
        for dim, size in zip(value.type.shape, arg.shape):
            if isinstance(dim, sympy.Symbol):
                if bindings.setdefault(dim, size) != size:
                    raise TypeError(f"input %{value.name}: {dim} is {bindings[dim]} elsewhere but {size} here")
    for value, arg in zip(inputs, args):  # a symbol seen only in an expression (N+1): solve
        for dim, size in zip(value.type.shape, arg.shape):
            unbound = sorted(getattr(dim, "free_symbols", set()) - set(bindings), key=str)
            if len(unbound) == 1:
                solutions = sympy.solve(sympy.Eq(dim, size), unbound[0])
                if len(solutions) == 1 and solutions[0].is_Integer:
                    bindings[unbound[0]] = int(solutions[0])
    for value, arg in zip(inputs, args):
        for dim, size in zip(value.type.shape, arg.shape):
            if evaluate_dim(dim, bindings) != size:
                raise TypeError(f"input %{value.name} expects {value.type}, got shape {list(arg.shape)}")
    return bindings


def concrete_attr(value, bindings: dict):
    """Replace symbolic dimensions in an attribute value by their bound sizes."""
    if isinstance(value, sympy.Expr):
        return evaluate_dim(value, bindings)
    if isinstance(value, (list, tuple)):
        return type(value)(concrete_attr(v, bindings) for v in value)
    return value


def interpret(graph: Graph, *args, observe=None):
    """Run `graph` on tensors; returns the single output, or a tuple of outputs.
    `observe(node, inputs)`, if given, sees each node's input tensors before it runs
    (calibration collects activation statistics with it)."""
    bindings = bind_symbols(graph.inputs, args)
    env: dict = dict(zip(graph.inputs, args))

    def read(value):
        return graph.constants[value.name] if isinstance(value, Constant) else env[value]

    for node in graph.nodes:
        attrs = {k: concrete_attr(v, bindings) for k, v in node.attrs.items()}
        inputs = [read(v) for v in node.inputs]
        if observe is not None:
            observe(node, inputs)
        env[node] = get_op(node.op).reference(*inputs, **attrs)
    outputs = tuple(read(v) for v in graph.outputs)
    return outputs[0] if len(outputs) == 1 else outputs
