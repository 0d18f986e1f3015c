"""A compiled graph at run time: its partitioned steps, the kernel of each group, and
the executor that runs them; what `fuselm.compile` builds and an artifact loads.

It takes the flat tensors of the call signature (frontend/signature.py) and returns
the model's result rebuilt; inputs the model updates in place (a KV cache) are written
back when a kernel did not write them in place itself.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Optional

from ..errors import FuselmError
from ..frontend.guards import ShapeGuards
from ..frontend.signature import TENSOR, CallSignature, rebuild_output
from ..ir.graph import Graph, Input, Node
from ..ir.interpreter import bind_symbols
from ..ir.registry import get_op
from ..target import Target
from .executor import Executor
from .index_bounds import IndexBounds
from .varlen import PackingInputs


@dataclass(frozen=True)
class KernelInfo:
    name: str
    ops: tuple  # the IR ops it fused
    source_path: Optional[str]
    launches: int  # how many groups of the graph run it (identical layers share kernels)


class CompiledGraph:
    """One captured graph, its kernels and the executor that runs them."""

    def __init__(self, graph: Graph, steps: list, launches: list, fallbacks: Counter, signature: CallSignature,
                 output, target: Target, training: bool = False, program=None, guards: Optional[ShapeGuards] = None,
                 updates: Optional[tuple] = None, state: Optional[dict] = None):
        """`guards`, `updates` and `state` as in frontend.capture.Captured (`state` maps
        each state input to a getter of the module buffer it carries); without `updates`
        (an artifact's graph), each extra output is traced to its input through the ops
        that alias one."""
        self.graph, self.steps, self.target, self.training = graph, steps, target, training
        self.guards = guards or ShapeGuards()  # conditions on sizes of the branches the capture took
        self._state = list((state or {}).values())  # getters, in the order of the graph inputs after the call's
        self._packing = PackingInputs.of(graph)  # pack_varlen's inputs, last: derived from the padding mask
        self.program = program  # the whole graph as one native program (cpu), else None: the executor runs it
        self.fallbacks = fallbacks
        self.signature, self.output = signature, output
        self._launches = launches
        kernels = {id(group): kernel for group, kernel in launches}
        self._executor = Executor(graph, steps, lambda group: kernels[id(group)].run)
        self._user_outputs = len([c for c in output.constants if c is TENSOR])
        if updates is None:
            updates = [_updated_input(v).name for v in graph.outputs[self._user_outputs:]]
        names = [v.name for v in graph.inputs]
        self._updated_inputs = [names.index(name) for name in updates]
        self._index_bounds = IndexBounds(graph)

    def serves(self, signature: CallSignature, tensors: tuple, training: bool) -> bool:
        if training != self.training or signature.guard_key() != self.signature.guard_key():
            return False
        if len(tensors) != len(self.signature.names):
            return False
        tensors = self.graph_inputs(tensors)
        if len(tensors) != len(self.graph.inputs):
            return False
        try:
            bind_symbols(self.graph.inputs, tensors)
        except TypeError:
            return False
        return self.guards.holds(self.signature.names, tensors)

    def graph_inputs(self, tensors: tuple) -> tuple:
        """The call's tensors, then the graph inputs it derives from them: the state
        buffers, then the packing inputs."""
        if self._state:
            tensors = tensors + tuple(buffer() for buffer in self._state)
        if self._packing is not None:
            tensors = tensors + self._packing.derive(tensors)
        return tensors

    def run(self, tensors: tuple):
        tensors = self.graph_inputs(tensors)
        self._index_bounds.check(tensors)
        results = self.program(*tensors) if self.program is not None else self._executor(*tensors)
        results = results if isinstance(results, tuple) else (results,)
        for index, value in zip(self._updated_inputs, results[self._user_outputs:]):
            if value.data_ptr() != tensors[index].data_ptr():  # a write the kernels did not do in place
                tensors[index].copy_(value)
        def sizes():
            return {str(k): v for k, v in bind_symbols(self.graph.inputs, tensors).items()}

        return rebuild_output(self.output.spec, self.output.constants, results[: self._user_outputs], sizes)

    @property
    def launches(self) -> list:
        """[(group, Kernel)] in launch order."""
        return list(self._launches)

    @property
    def kernels(self) -> list:
        counts = Counter(kernel.name for _, kernel in self._launches)
        seen, infos = set(), []
        for _, kernel in self._launches:
            if kernel.name not in seen:
                seen.add(kernel.name)
                infos.append(KernelInfo(kernel.name, kernel.ops, kernel.source_path, counts[kernel.name]))
        return infos


class DescribesCompiledGraph:
    """`.graph`, `.steps`, `.kernels` and `.fallbacks` of the CompiledGraph in `_compiled`,
    as `fuselm.compile`'s result has them (for an artifact, an ONNX model)."""
    _compiled: CompiledGraph

    @property
    def graph(self):
        return self._compiled.graph

    @property
    def steps(self) -> list:
        return self._compiled.steps

    @property
    def kernels(self) -> list:
        return self._compiled.kernels

    @property
    def fallbacks(self) -> dict:
        return dict(self._compiled.fallbacks)


def _updated_input(value) -> Input:
    """The graph input an in-place update's final value belongs to."""
    while isinstance(value, Node) and get_op(value.op).aliases_input is not None:
        value = value.inputs[get_op(value.op).aliases_input]
    if not isinstance(value, Input):
        raise FuselmError(f"a graph output beyond the model's results is not an updated input: {value}")
    return value
