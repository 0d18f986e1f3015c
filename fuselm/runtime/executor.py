"""The executor: a flat list of kernel calls and free views over a partitioned graph.

Each step reads tensors by value: graph inputs, weights (held once, by the graph's
constants, and handed to kernels as they are) or earlier results. A cache op gets its
layer's `[1, ...]` view of the cache and writes it in place; its result is the whole
cache again, so the graph output that is the final cache is the caller's own buffer.
A value is dropped after its last reader, so peak memory follows liveness.

Binding symbols to sizes (and the view attributes that depend on them) costs sympy
work, so it is done once per distinct input signature (shapes and dtypes) and reused:
decode steps of the same batch shape pay nothing for it.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..ir.graph import Constant, Graph
from ..ir.interpreter import bind_symbols, concrete_attr
from ..ir.registry import get_op
from ..passes.partition import KernelGroup, ViewStep

MAX_PLANS = 256  # input signatures remembered (decode grows the block table width slowly)


class Executor:
    def __init__(self, graph: Graph, steps: list, kernel_for: Callable[[KernelGroup], Callable]):
        self.graph = graph
        self.steps = steps
        self.calls = [kernel_for(step) if isinstance(step, KernelGroup) else None for step in steps]
        self.last_use = self._last_uses()
        self._plans: dict = {}  # input signature -> concrete attrs of each view step

    def _last_uses(self) -> dict:
        last: dict = {}
        for index, step in enumerate(self.steps):
            for value in _reads(step):
                last[value] = index
        for value in self.graph.outputs:
            last[value] = len(self.steps)
        return last

    def _view_attrs(self, args) -> list:
        signature = tuple((a.dtype, tuple(a.shape)) if isinstance(a, torch.Tensor) else type(a) for a in args)
        plan = self._plans.get(signature)
        if plan is None:
            bindings = bind_symbols(self.graph.inputs, args)
            plan = [{k: concrete_attr(v, bindings) for k, v in step.node.attrs.items()}
                    if isinstance(step, ViewStep) else None for step in self.steps]
            if len(self._plans) >= MAX_PLANS:
                self._plans.clear()
            self._plans[signature] = plan
        return plan

    def __call__(self, *args):
        view_attrs = self._view_attrs(args)
        env = dict(zip(self.graph.inputs, args))

        def read(value):
            return self.graph.constants[value.name] if isinstance(value, Constant) else env[value]

        for index, (step, call) in enumerate(zip(self.steps, self.calls)):
            if isinstance(step, ViewStep):
                node = step.node
                env[node] = get_op(node.op).reference(read(node.inputs[0]), **view_attrs[index])
            else:
                env[step.result] = self._run_kernel(step, call, [read(v) for v in step.args])
            for value in _reads(step):
                if self.last_use.get(value) == index and not isinstance(value, Constant):
                    env.pop(value, None)
        outputs = tuple(read(v) for v in self.graph.outputs)
        return outputs[0] if len(outputs) == 1 else outputs

    @staticmethod
    def _run_kernel(step: KernelGroup, call: Callable, tensors: list):
        if step.cache_layer is None:
            return call(*tensors)
        position = 0 if step.result.op == "kv_cache_write" else 1
        cache = tensors[position]
        tensors[position] = cache[step.cache_layer : step.cache_layer + 1]
        out = call(*tensors)
        return cache if step.result.op == "kv_cache_write" else out


def _reads(step) -> tuple:
    return (step.node.inputs[0],) if isinstance(step, ViewStep) else step.args


FALLBACK_PREFIX = "fallback_"  # a fallback kernel's name: this, then what `compiled.fallbacks` counts


def fallback_kernel(group: KernelGroup, target: str, name: str):
    """The Kernel of a group no generated kernel computes (fallback ops, or ops no
    emitter takes): the IR reference runs it (torch for `aten` nodes)."""
    from ..codegen.kernel import Kernel

    return Kernel(name, target, "", "", interpreted_kernel(group), ops=group.ops)


def interpreted_kernel(group: KernelGroup) -> Callable:
    """A kernel that runs the group with the reference interpreter (the oracle)."""
    from ..ir.interpreter import interpret

    return lambda *tensors: interpret(group.graph, *tensors)
